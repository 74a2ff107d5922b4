"""The plain classes Ray hosts: a vLLM generator, a DeepSpeed learner rank, a reward worker, and the weight sync between learner and generators."""
