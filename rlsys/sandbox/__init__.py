"""Running code a model wrote: one isolated execution (execute.py), and a completion's program
judged against its problem's tests there (judge.py, reward.verifier=code)."""
