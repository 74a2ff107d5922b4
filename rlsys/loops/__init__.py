"""The loops: GRPO training (train.py) and evaluation (evaluate.py)."""
