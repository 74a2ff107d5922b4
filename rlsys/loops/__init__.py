"""The loops the commands run, each readable top to bottom:

- train.py: THE LOOP, synchronous GRPO (`rlsys train`), with its preflight and run folder;
- async_train.py: the asynchronous loop (trainer.max_staleness > 0), generation overlapping learning;
- rollouts.py: one step's scored rollouts for both loops (DAPO's dynamic sampling and shaping);
- resume.py: which checkpoint a run continues from, and what it may change;
- evaluate.py: pass@1 / cons@k evaluation (`rlsys eval`, and eval.every during training);
- sft.py: supervised fine-tuning on (prompt, response) pairs (`rlsys sft`);
- sample.py: rejection sampling into an SFT dataset (`rlsys sample`);
- pipeline.py: R1's stages chained (`rlsys pipeline`, `rlsys distill`).
"""
