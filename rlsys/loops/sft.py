"""`rlsys sft`: supervised fine-tuning on (prompt, response) pairs with the DeepSpeed learner group.

R1's cold start and its distillation (R1.md): the model is shown responses (long chains of thought,
often rlsys's own, made by `rlsys sample`) and learns to write them after the prompt. The same
learner ranks as `rlsys train` (rlsys.actors.learner.Learner.train_sft), the same token-budget
packing, the same checkpoints (an HF folder the next stage loads as model.path, plus the
learner state), metrics.jsonl, progress bar and trainer.resume.

Each step is one optimizer step on learner.mini_batch_size examples, drawn in a seeded shuffle of
the data per epoch (an epoch's last few examples, fewer than a mini-batch, wait for the next
shuffle); the run lasts sft.epochs epochs. The prompt is data.prompt_field in data.template (as
the generators see it in RL, prefill included); the response is sft.response_field followed by
the tokenizer's end-of-sequence token (the model must learn to stop); the loss covers the
response tokens only (rlsys.math.sft).
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

from tqdm import tqdm

from rlsys.checkpoint import commit, read_trainer_state, write_trainer_state
from rlsys.cluster.storage import RunStorage, open_run_storage
from rlsys.config import Config, ConfigError, to_dict, to_yaml
from rlsys.data.models import resolve_model
from rlsys.data.prompts import DataError, apply_template, encode, load_rows, resolve_data_path
from rlsys.loops.resume import check_same_run, cut_logs, resume_point
from rlsys.loops.train import check_bad_steps, due, resolve_run_dir, saves_left
from rlsys.math.sft import sft_batch
from rlsys.observe.metrics import RunLog, sparkline

Example = tuple[list[int], list[int]]
"""(prompt ids, response ids ending with EOS)."""


def sft(cfg: Config) -> Path:
    """Fine-tune cfg.model on cfg.data's (prompt, response) pairs; returns the run folder, whose
    last checkpoint (checkpoints/step_N) is the fine-tuned model."""
    from rlsys.cluster.groups import init_ray
    from rlsys.cluster.learners import start_learner_group

    run_dir = resolve_run_dir(cfg.trainer.output_dir)
    storage = open_run_storage(cfg.trainer.output_dir, cfg.trainer.resume, run_dir)  # a URI: staged in run_dir
    resume_from = resume_point(cfg, run_dir, storage)
    resumed = read_trainer_state(resume_from) if resume_from is not None else None
    if resumed is not None:
        if resumed.get("kind") != "sft":
            raise ConfigError(f"trainer.resume={resume_from}: a {resumed.get('kind', 'grpo')} checkpoint; "
                              f"rlsys sft continues only its own runs")
        check_same_run(resumed["config"], cfg)
    if (run_dir / "metrics.jsonl").exists() and resumed is None:
        raise FileExistsError(f"trainer.output_dir={run_dir} already holds a run (metrics.jsonl); continue it with "
                              f"trainer.resume=auto, or choose another trainer.output_dir")
    model_path = resolve_model(cfg.model)
    examples = load_examples(cfg, model_path)
    total = sft_steps(len(examples), cfg)
    start = resumed["step"] if resumed is not None else 0
    if start >= total:
        print(f"[rlsys] {resume_from} is at step {start} of {total}: nothing to train", flush=True)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if resumed is not None:
        print(f"[rlsys] resuming from {resume_from}: step {start}; {cut_logs(run_dir, start)} log line(s) of "
              f"steps >= {start} dropped (they run again)", flush=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    print(f"[rlsys] sft: {len(examples)} examples, {cfg.sft.epochs} epoch(s), {total} steps of "
          f"{cfg.learner.mini_batch_size}; run folder {run_dir}"
          + (f" (staged here, copied to {cfg.trainer.output_dir} after every step)" if storage is not None else ""),
          flush=True)
    init_ray(cfg)
    learner, placement = start_learner_group(learner_config(cfg), model_path, updates=total)
    log = RunLog(run_dir, cfg)
    try:
        if resumed is not None:
            trained = learner.load_state(resume_from, storage=storage)
            assert trained == start, f"{resume_from}: the learner has taken {trained} steps, the driver {start}"
        bar = tqdm(range(start, total), desc="sft", initial=start, total=total, disable=not cfg.trainer.progress,
                   dynamic_ncols=True)
        curve: list[float] = []
        bad = 0
        for step in bar:
            rows = step_rows(len(examples), cfg.learner.mini_batch_size, cfg.trainer.seed, step)
            batch = sft_batch([examples[i] for i in rows])
            t0 = time.perf_counter()
            learn = learner.train_sft(batch)
            step_s = time.perf_counter() - t0
            bad = check_bad_steps(step, learn, bad, cfg.learner.max_bad_steps)
            tokens = int(batch.attention_mask.sum())
            metrics = {**learn, "epoch": step / steps_per_epoch(len(examples), cfg), "tokens/total": tokens,
                       "tokens/response": int(batch.loss_mask.sum()), "timing/step": step_s,
                       "throughput/tokens_per_s": tokens / step_s}
            p, r = examples[rows[0]]
            log.log(step, metrics, {"prompt_tokens": len(p), "response_tokens": len(r), "row": rows[0]})
            last = step + 1 == total
            if due(step, cfg.trainer.save_every, last) or last:
                save(learner, run_dir, step + 1, cfg, saves_left(step + 1, total, cfg.trainer.save_every), storage)
            if storage is not None:
                storage.upload()
            curve.append(learn["nll"])
            bar.set_postfix(nll=f"{learn['nll']:.3f}", curve=sparkline(curve[-30:], 0.0, max(curve)))
    finally:
        log.close()
        learner.shutdown(placement)
        if storage is not None:  # also after a crash: what was written is on the storage
            storage.upload()
    return run_dir


def learner_config(cfg: Config) -> Config:
    """The learner group's config for SFT: no reference model (algo.beta 0), one mini-batch per
    step, each example its own sequence (no prompt sharing: examples rarely share a prompt)."""
    return dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, beta=0.0),
                               learner=dataclasses.replace(cfg.learner, epochs=1, share_prompts=False))


def steps_per_epoch(n: int, cfg: Config) -> int:
    return n // cfg.learner.mini_batch_size


def sft_steps(n: int, cfg: Config) -> int:
    """Optimizer steps in the run: sft.epochs passes of n examples, learner.mini_batch_size a step."""
    if steps_per_epoch(n, cfg) == 0:
        raise DataError(f"{n} SFT example(s), fewer than learner.mini_batch_size={cfg.learner.mini_batch_size} "
                        f"(one step's worth): lower learner.mini_batch_size or add data")
    return cfg.sft.epochs * steps_per_epoch(n, cfg)


def step_rows(n: int, size: int, seed: int, step: int) -> list[int]:
    """The example indices of step `step`: a seeded shuffle per epoch, cut in runs of `size`
    (the same on a resume: nothing but the step count is state).

    >>> step_rows(5, 2, 0, 0) + step_rows(5, 2, 0, 1)  # epoch 0: 4 of the 5, none twice
    [3, 4, 0, 1]
    >>> step_rows(5, 2, 0, 2) + step_rows(5, 2, 0, 3)  # epoch 1: another shuffle
    [1, 0, 4, 3]
    """
    per_epoch = n // size
    epoch, k = divmod(step, per_epoch)
    order = random.Random(seed * 1_000_003 + epoch).sample(range(n), n)
    return order[k * size:(k + 1) * size]


def load_examples(cfg: Config, model_path: str) -> list[Example]:
    """Token ids of every (prompt, response) pair of cfg.data; a bad row (missing or empty field,
    a pair longer than sft.max_length) stops with file, row and reason, or is left out and counted
    with data.on_bad_row=skip."""
    from transformers import AutoTokenizer

    if cfg.data.name:
        raise ConfigError(f"rlsys sft reads (prompt, response) pairs from data.path; data.name={cfg.data.name} is a "
                          f"registry dataset of questions and gold answers, not responses (make responses with "
                          f"`rlsys sample`)")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model {model_path}: its tokenizer has no end-of-sequence token, which every SFT response "
                          f"ends with")
    skipped: list[str] = []
    rows = load_rows(dataclasses.replace(cfg.data, answer_field=cfg.sft.response_field), skipped)
    prompts = encode([apply_template(q, cfg.data, tokenizer) for q, _ in rows], tokenizer, cfg.data.template)
    responses = tokenizer([r for _, r in rows], add_special_tokens=False)["input_ids"]
    path = resolve_data_path(cfg.data.path)
    examples = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        r = r if r and r[-1] == tokenizer.eos_token_id else r + [tokenizer.eos_token_id]
        if len(p) + len(r) > cfg.sft.max_length:
            why = (f"{path}: row {i}: prompt + response are {len(p)} + {len(r)} tokens, more than "
                   f"sft.max_length={cfg.sft.max_length}")
            if cfg.data.on_bad_row != "skip":
                raise DataError(why)
            skipped.append(why)
            continue
        examples.append((p, r))
    if skipped:
        print(f"[rlsys] data.on_bad_row=skip: left out {len(skipped)} bad row(s) of {path}, {len(examples)} remain: "
              + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""), flush=True)
    return examples


def save(learner, run_dir: Path, step: int, cfg: Config, left: int | None = None,
         storage: RunStorage | None = None) -> Path:
    """Checkpoint step_<step>: the HF folder and every rank's learner state, then the driver's.
    left: the saves the run still makes after this one (for the disk check of commit); storage:
    the ranks upload their parts there themselves (rlsys.cluster.storage)."""

    def write(folder: Path) -> dict:
        uploaded = learner.save(folder, storage=storage)
        write_trainer_state(folder, {"kind": "sft", "step": step, "config": to_dict(cfg)})
        return uploaded

    return commit(run_dir, step, write, cfg.trainer.keep_last, left)

