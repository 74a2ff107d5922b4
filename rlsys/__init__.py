"""rlsys: R1-Zero-style GRPO on Ray. The folders are the architecture, each layer using only
those below it:

    cli.py     the commands (rlsys train | eval | export | data prepare | report)
    loops/     THE LOOP (train.py) and evaluation
    cluster/   the Ray edge: placement groups, actors, group handles
    actors/    plain classes Ray hosts: vLLM generator, DeepSpeed learner rank, reward worker, weight sync
    math/      pure functions: GRPO, rule rewards, batch assembly, FLOPs
    data/      prompts, the dataset registry, offline models, toy tasks
    observe/   metrics logs, profiling timeline, rlsys report
    config.py  types.py  checkpoint.py  default.yaml
"""
