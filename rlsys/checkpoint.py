"""Checkpoints: what a run folder holds to be exported, evaluated or resumed.

    <run_dir>/checkpoints/
        step_<N>/                 an HF folder (config.json, *.safetensors, tokenizer) that
                                  transformers and vLLM load directly, plus
            learner/              every learner rank's DeepSpeed state (optimizer, LR scheduler,
                                  update count, RNG) as JSON + safetensors, no pickle
                                  (rlsys.actors.state_tree)
            trainer_state.json    the driver's: step, weight version, prompt stream position,
                                  RNG, the resolved config
        latest                    the name of the newest whole checkpoint, written last

A checkpoint is written into step_<N>.partial and renamed when whole (`commit`), then `latest`
is replaced (write to a temporary name, rename): a run killed while saving leaves the previous
checkpoint whole and `latest` naming it. Folders with ".partial" in their name never count.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import IO, Callable, Iterable

TRACKER = "latest"
TRAINER_STATE = "trainer_state.json"


def safe_relative(name: str) -> Path:
    """A file name from a checkpoint stream, relative and inside its folder, or an error."""
    path = Path(name)
    if not name or path.is_absolute() or any(part in ("", ".", "..") for part in path.parts):
        raise ValueError(f"checkpoint stream names a file outside its folder: {name!r}")
    return path


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    root = run_dir / "checkpoints"
    found = {}
    for p in root.glob("step_*") if root.is_dir() else []:
        suffix = p.name.removeprefix("step_")
        if suffix.isdigit() and (p / "config.json").is_file():  # .partial folders never count
            found[int(suffix)] = p
    return found


def find_resumable(run_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume=auto` continues from: the one `latest` names, else (a run
    killed before its first tracker write, a tracker lost in a copy) the newest whole checkpoint
    with trainer state. None: nothing to resume from."""
    tracker = run_dir / "checkpoints" / TRACKER
    if tracker.is_file():
        named = run_dir / "checkpoints" / tracker.read_text().strip()
        if (named / TRAINER_STATE).is_file():
            return named
        print(f"[rlsys] {tracker} names {named.name}, which is not a whole checkpoint; looking for the newest "
              f"one", flush=True)
    whole = {step: p for step, p in list_checkpoints(run_dir).items() if (p / TRAINER_STATE).is_file()}
    return whole[max(whole)] if whole else None


def commit(run_dir: Path, step: int, write: Callable[[Path], None], keep_last: int = 0) -> Path:
    """Write checkpoint step_<step> atomically: `write(folder)` fills a temporary folder, which is
    renamed when whole; then `latest` names it; then all but the newest `keep_last` whole
    checkpoints are removed (0: keep all)."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():  # the same step saved again (a resumed run that repeats it): the new one wins
        shutil.rmtree(final)
    tmp.rename(final)
    tracker_tmp = root / f"{TRACKER}.partial"
    tracker_tmp.write_text(final.name + "\n")
    os.replace(tracker_tmp, root / TRACKER)
    if keep_last > 0:
        for old in sorted(list_checkpoints(run_dir))[:-keep_last]:
            shutil.rmtree(root / f"step_{old}")
    return final


def write_trainer_state(folder: Path, state: dict) -> None:
    (folder / TRAINER_STATE).write_text(json.dumps(state, indent=1))


def read_trainer_state(folder: Path) -> dict:
    path = folder / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a resumable checkpoint: no {TRAINER_STATE} (checkpoints written "
                                f"before rlsys saved trainer state hold weights only)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); this checkpoint cannot be resumed from, give an earlier "
                         f"one as trainer.resume=PATH") from None


def state_files(folder: Path, rank: int) -> list[tuple[str, bytes]]:
    """The learner state files of checkpoint `folder` that learner rank `rank` reads, (name
    relative to the checkpoint, bytes): its own ZeRO partition and the files every rank reads."""
    out = []
    for path in sorted((folder / "learner").rglob("*")):
        owner = re.search(r"zero_pp_rank_(\d+)_", path.name)
        if path.is_file() and (owner is None or int(owner.group(1)) == rank):
            out.append((path.relative_to(folder).as_posix(), path.read_bytes()))
    return out


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoints (expected {run_dir}/checkpoints/step_N/)")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint for step {step}; have steps {sorted(found)}")
    return found[step]


def is_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file()


def export(run_dir: Path, out: Path, step: int | None = None) -> Path:
    src = find_checkpoint(run_dir, step)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another folder")
    # The HF folder only: the learner state and the driver's are for resuming, not for serving.
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("learner", TRAINER_STATE))
    return out


def receive(chunks: Iterable[tuple[str, bytes]], folder: Path) -> None:
    """Write a streamed checkpoint's files, (relative name, chunk) in order, into `folder` (a
    `.partial` folder that `commit` renames when whole)."""
    files: dict[str, IO[bytes]] = {}
    try:
        for name, chunk in chunks:
            if name not in files:
                target = folder / safe_relative(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                files[name] = open(target, "wb")
            files[name].write(chunk)
    finally:
        for f in files.values():
            f.close()
