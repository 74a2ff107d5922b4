"""Checkpoints are HF folders `<run_dir>/checkpoints/step_<N>/` that transformers and vLLM load
directly; this module finds them, exports one, and writes one that a learner streamed from
another node (rlsys.actors.learner.Learner.save_files)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import IO, Iterable


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    root = run_dir / "checkpoints"
    found = {}
    for p in root.glob("step_*") if root.is_dir() else []:
        suffix = p.name.removeprefix("step_")
        if suffix.isdigit() and (p / "config.json").is_file():  # .partial folders never count
            found[int(suffix)] = p
    return found


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
    shutil.copytree(src, out, dirs_exist_ok=True)
    return out


def receive(chunks: Iterable[tuple[str, bytes]], path: Path) -> Path:
    """Write a streamed checkpoint's files, (file name, chunk) in order, into `path`: into
    `path.partial` first, renamed when complete, so that a reader (or a crash) never leaves a
    half-written checkpoint under its real name."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files: dict[str, IO[bytes]] = {}
    try:
        for name, chunk in chunks:
            if Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"checkpoint stream names a file outside its folder: {name!r}")
            if name not in files:
                files[name] = open(tmp / name, "wb")
            files[name].write(chunk)
    finally:
        for f in files.values():
            f.close()
    if not (tmp / "config.json").is_file():
        raise RuntimeError(f"checkpoint stream for {path} ended without config.json (got {sorted(files)})")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
