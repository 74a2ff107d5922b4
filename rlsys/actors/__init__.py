"""The plain classes Ray hosts: a vLLM generator (and the tools its rollouts call), a DeepSpeed learner
rank, a reward worker, a sandbox worker, and the weight sync between learner and generators."""
