"""Resuming a run: which checkpoint, whether the config still describes the same run, the driver's
state (step, weight version, prompt stream position, RNG), and the run folder's logs cut back to
the checkpoint so that no step is logged twice.

What makes a resumed run the uninterrupted one from step k on: the learner's DeepSpeed state
(weights, optimizer, LR scheduler, update count, RNG; rlsys.actors.learner_checkpoint.CheckpointIO.load_state),
the prompt stream's (epoch, cursor) (its order is a function of the seed and the epoch), and the
generators' sampling, which is reseeded per prompt chunk from (trainer.seed, step, chunk)
(rlsys.cluster.pool.chunk_seed): a new engine samples what the old one would have, provided the
pool has as many engines (the chunks are cut by pool size).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from rlsys.checkpoint import TRAINER_STATE, find_resumable, read_trainer_state, verify
from rlsys.cluster.storage import RunStorage, is_uri
from rlsys.config import Config, ConfigError, to_dict
from rlsys.data.prompts import PromptStream

SAME_RUN = ("model", "data", "algo", "learner", "reward", "trainer.seed", "generator.temperature",
            "generator.top_p", "generator.max_tokens", "generator.max_model_len", "sft.response_field",
            "sft.max_length")
"""What a resumed run may not change: it would be another run's continuation. Anything else
(cluster size and placement, trainer.total_steps with a constant LR, eval, logging) may change."""

LOGS = ("metrics.jsonl", "samples.jsonl", "pool.jsonl")


def resume_point(cfg: Config, run_dir: Path, storage: RunStorage | None = None) -> Path | None:
    """The checkpoint this run continues from; None for a new run. Never a silent new start over
    an existing run: a resume request without a checkpoint stops here. Its files are checked
    against their checksums here, before any actor starts: a damaged checkpoint stops the resume
    naming the file and the newest older whole one (rlsys.checkpoint.verify); choosing it is the
    user's call, never a silent step back.

    storage: trainer.output_dir is a storage URI, run_dir its staging folder: `auto` continues
    from the storage's `latest` checkpoint, fetched (its small files only) into run_dir, sizes of
    every file checked there, sha256 by each rank as it downloads its part
    (RunStorage.fetch_resumable)."""
    want = cfg.trainer.resume
    if not want:
        return None
    if is_uri(want):
        raise ConfigError(f"trainer.resume={want}: a checkpoint on storage is continued from with trainer.resume=auto "
                          f"and trainer.output_dir=<the run's URI> (its latest checkpoint, into the same URI); to "
                          f"continue from another one, copy it to local disk and give its path")
    if want == "auto" and storage is not None:
        return storage.fetch_resumable()
    if want == "auto":
        found = find_resumable(run_dir) if run_dir.is_dir() else None
        if found is None:
            raise FileNotFoundError(
                f"trainer.resume=auto: {run_dir} holds no whole checkpoint to continue from "
                f"({'no such folder' if not run_dir.is_dir() else 'nothing under checkpoints/ with trainer_state.json'})"
                f". Start a new run without trainer.resume, or give a checkpoint folder")
        verify(found)
        return found
    path = Path(want).expanduser().resolve()
    if (path / TRAINER_STATE).is_file():  # checked first: a damaged trainer_state.json is named as damage
        verify(path)
    read_trainer_state(path)  # a folder that cannot be resumed from stops here, with the reason
    return path


def check_same_run(saved: dict, cfg: Config) -> None:
    """The config of a resumed run against the one its checkpoint was written with."""
    now = to_dict(cfg)
    differ = []
    for key in SAME_RUN:
        section, _, field = key.partition(".")
        old, new = saved.get(section, {}), now[section]
        old, new = (old.get(field), new.get(field)) if field else (old, new)
        if old != new:
            differ += [f"{key}: {old!r} -> {new!r}"] if field else [
                f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
    lr_changes = (saved["trainer"]["total_steps"] != cfg.trainer.total_steps and cfg.learner.lr_schedule != "constant")
    if lr_changes:
        differ.append(f"trainer.total_steps: {saved['trainer']['total_steps']} -> {cfg.trainer.total_steps} "
                      f"(learner.lr_schedule={cfg.learner.lr_schedule} spans total_steps)")
    if differ:
        raise ConfigError("trainer.resume: this config describes another run than the checkpoint's; it changes "
                          + "; ".join(differ))


def driver_state(step: int, version: int, prompts: PromptStream, cfg: Config, prompt_state: dict | None = None
                 ) -> dict:
    """What the driver writes into a checkpoint (trainer_state.json). prompt_state: the stream's
    position the resumed run takes its next prompts from (None: where it is now; the asynchronous
    loop has drawn prompts for batches in flight past it, which a resume samples again)."""
    np_state = np.random.get_state()
    return {
        "step": step, "weight_version": version, "prompts": prompt_state or prompts.state(),
        "rng": {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "torch": torch.get_rng_state().tolist()},
        "config": to_dict(cfg),
    }


def restore_driver(state: dict, prompts: PromptStream) -> tuple[int, int]:
    """The driver as it was at the checkpoint; returns (step, weight version)."""
    prompts.load_state(state["prompts"])
    rng = state["rng"]
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    return state["step"], state["weight_version"]


def cut_logs(run_dir: Path, step: int) -> int:
    """Drop what the run logged for steps >= `step` (the checkpoint's step: they run again) from
    the run folder's JSON-lines logs; returns how many lines went. The files are rewritten whole
    under a temporary name, then renamed."""
    dropped = 0
    for name in LOGS:
        path = run_dir / name
        if not path.is_file():
            continue
        keep, lines = [], path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                logged = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                if number == len(lines):  # a line cut short by the kill
                    dropped += 1
                    continue
                raise ValueError(f"{path}:{number}: not a step record: {line[:80]!r}") from None
            if logged < step:
                keep.append(line)
            else:
                dropped += 1
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.rename(path)
    return dropped
