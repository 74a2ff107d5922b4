"""Pure functions: the GRPO objective, rule rewards, batch assembly, FLOP counts."""
