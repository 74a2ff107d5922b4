"""Running code a model wrote: isolated executions (execute.py)."""
