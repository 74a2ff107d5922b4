"""Checkpoints: what a run folder holds to be exported, evaluated or resumed.

    <run_dir>/checkpoints/
        step_<N>/                 an HF folder (config.json, *.safetensors, tokenizer) that
                                  transformers and vLLM load directly, plus
            learner/              every learner rank's DeepSpeed state (optimizer, LR scheduler,
                                  update count, RNG) as JSON + safetensors, no pickle
                                  (rlsys.actors.state_tree)
            trainer_state.json    the driver's: step, weight version, prompt stream position,
                                  RNG, the resolved config
            checksums.json        every other file's relative path, size and sha256, written last
        latest                    the name of the newest whole checkpoint, written last

A checkpoint is written into step_<N>.partial and renamed when whole (`commit`), then `latest`
is replaced (write to a temporary name, rename): a run killed while saving leaves the previous
checkpoint whole and `latest` naming it. Folders with ".partial" in their name never count. A
save that fails with an OSError (a full disk) removes its .partial folder, giving the space back.

checksums.json is computed by the driver in `commit`, over the files as they landed in the run
folder: every learner rank's files land there before it (written there with shared storage, sent
to the driver without), so one place covers them all, and what is checked on resume is exactly
what was written. With a storage URI as trainer.output_dir the ranks upload their parts
themselves and report each file's size and sha256 as they sent it; `commit` merges those into
the same checksums.json (rlsys.cluster.storage). A resume checks them before any actor starts (`verify`): a truncated, altered
or missing file stops it, naming the file and the newest older checkpoint whose checksums match.
Hashing reads each file once more at save and at resume (sha256: about 1 s per 500 MB).
Checkpoints written before rlsys wrote checksums.json are resumed from with a printed note that
nothing could be checked; a checkpoint that has one and fails it is never resumed from silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

from rlsys.config import ConfigError

TRACKER = "latest"
TRAINER_STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"


class DamagedCheckpoint(ConfigError):
    """A checkpoint whose files do not match its checksums.json; trainer.resume must name another."""


def safe_relative(name: str) -> Path:
    """A file name from a checkpoint stream, relative and inside its folder, or an error."""
    path = Path(name)
    if not name or path.is_absolute() or any(part in ("", ".", "..") for part in path.parts):
        raise ValueError(f"checkpoint stream names a file outside its folder: {name!r}")
    return path


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    return steps_in(run_dir / "checkpoints")


def steps_in(root: Path) -> dict[int, Path]:
    """The step_<N> folders in `root` that hold a model (config.json), by step."""
    found = {}
    for p in root.glob("step_*") if root.is_dir() else []:
        suffix = p.name.removeprefix("step_")
        if suffix.isdigit() and (p / "config.json").is_file():  # .partial folders never count
            found[int(suffix)] = p
    return found


def find_resumable(run_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume=auto` continues from: the one `latest` names, else (a run
    killed before its first tracker write, a tracker lost in a copy) the newest whole checkpoint
    with trainer state. None: nothing to resume from. Its files are not checked here: the resume
    does that (`verify`) and stops on damage rather than fall back to an older one unasked."""
    tracker = run_dir / "checkpoints" / TRACKER
    if tracker.is_file():
        named = run_dir / "checkpoints" / tracker.read_text().strip()
        if (named / TRAINER_STATE).is_file():
            return named
        print(f"[rlsys] {tracker} names {named.name}, which is not a whole checkpoint; looking for the newest "
              f"one", flush=True)
    whole = {step: p for step, p in list_checkpoints(run_dir).items() if (p / TRAINER_STATE).is_file()}
    return whole[max(whole)] if whole else None


def commit(run_dir: Path, step: int, write: Callable[[Path], dict | None], keep_last: int = 0,
           saves_left: int | None = None) -> Path:
    """Write checkpoint step_<step> atomically: `write(folder)` fills a temporary folder, then its
    checksums.json is written (with the entries `write` returns for files it put elsewhere: the
    ranks' parts uploaded straight to a storage URI), then the folder is renamed; then `latest` names it; then all but the
    newest `keep_last` whole checkpoints are removed (0: keep all). Then a warning is printed when
    the run folder's disk cannot hold the checkpoints still to come at this one's size (`disk_note`;
    saves_left: how many saves the run still makes after this one, None: unknown, only the next
    is counted)."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
    tmp.mkdir(parents=True)
    try:
        elsewhere = write(tmp)
        if elsewhere is not None and not isinstance(elsewhere, dict):
            raise TypeError(f"commit({run_dir}, {step}): write(folder) returns the entries of files it put "
                            f"elsewhere (a dict) or None, not {type(elsewhere).__name__}")
        write_checksums(tmp, elsewhere)  # last: a folder without it was not written whole
    except OSError:
        # A full disk, most often: give the space back now rather than at the next save of this
        # step. What is left if this fails never counts (.partial); the write's error is the one
        # to report, so a failure to remove is not raised over it.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same step saved again (a resumed run that repeats it): the new one wins
        shutil.rmtree(final)
    tmp.rename(final)
    tracker_tmp = root / f"{TRACKER}.partial"
    tracker_tmp.write_text(final.name + "\n")
    os.replace(tracker_tmp, root / TRACKER)
    if keep_last > 0:
        for old in sorted(list_checkpoints(run_dir))[:-keep_last]:
            shutil.rmtree(root / f"step_{old}")
    # The bytes on this disk: the ranks' parts on a storage URI are not.
    size = sum(entry["size"] for name, entry in read_checksums(final).items() if (final / name).is_file())
    note = disk_note(root, size, len(list_checkpoints(run_dir)), keep_last, saves_left, shutil.disk_usage(root).free)
    if note:
        print(f"[rlsys] warning: {note}", flush=True)
    return final


def disk_need(size: int, kept: int, keep_last: int, saves_left: int | None) -> int:
    """Bytes the run folder's disk must still give the checkpoints to come, each of `size` bytes,
    with `kept` whole ones on it now. A save is written whole beside the ones kept before the
    oldest is removed, so with keep_last=k the folder peaks at k + 1; with 0 every one stays.
    saves_left None (unknown): the next save only.

    >>> disk_need(10, kept=3, keep_last=0, saves_left=5)  # every one stays
    50
    >>> disk_need(10, kept=1, keep_last=3, saves_left=5)  # grows to 3, then one transient copy
    30
    >>> disk_need(10, kept=3, keep_last=3, saves_left=5), disk_need(10, kept=3, keep_last=0, saves_left=None)
    (10, 10)
    >>> disk_need(10, kept=3, keep_last=0, saves_left=0)
    0
    """
    if saves_left == 0:
        return 0
    if saves_left is None:
        return size
    if keep_last == 0:
        return size * saves_left
    return size * min(saves_left, max(keep_last - kept, 0) + 1)


def disk_note(root: Path, size: int, kept: int, keep_last: int, saves_left: int | None, free: int) -> str | None:
    """A warning when `free` bytes on the disk of `root` cannot hold the checkpoints still to come
    (disk_need), naming the largest trainer.keep_last that fits; None when they fit. A warning, not
    a stop: the disk may be cleared meanwhile, and a save that does not fit loses nothing (commit
    removes its .partial folder, the previous checkpoint stays whole and named by `latest`)."""
    need = disk_need(size, kept, keep_last, saves_left)
    if need <= free or size == 0:
        return None
    gib = 1 << 30
    fits = (free + kept * size) // size - 1  # keep_last=k peaks at k + 1 checkpoints
    what = "the next checkpoint" if saves_left is None else f"the {saves_left} checkpoint(s) still to write"
    fix = (f"trainer.keep_last={fits} fits (checkpoints are {size / gib:.2f} GiB each)" if fits >= 1
           else "not even one more fits: free space on it")
    return (f"{root} has {free / gib:.2f} GiB free; {what} need {need / gib:.2f} GiB with trainer.keep_last="
            f"{keep_last} ({'every checkpoint is kept' if keep_last == 0 else f'at most {keep_last} + 1 at a time'}"
            f"): a save that does not fit stops the run (the previous checkpoint stays whole). {fix}")


def sha256_of(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """Every file of checkpoint `folder` but checksums.json, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != CHECKSUMS)


def write_checksums(folder: Path, elsewhere: dict[str, dict] | None = None) -> None:
    """checksums.json: each file's size and sha256, for `verify`; elsewhere: the entries of the
    checkpoint's files that are not in `folder` (uploaded by the ranks to a storage URI)."""
    files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
             for name in checkpoint_files(folder)}
    clash = sorted(set(files) & set(elsewhere or {}))
    assert not clash, f"{folder}: files both in the folder and put elsewhere: {clash[:5]}"
    files = dict(sorted((files | (elsewhere or {})).items()))
    (folder / CHECKSUMS).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def read_checksums(folder: Path) -> dict[str, dict] | None:
    """checksums.json's {relative path: {"size", "sha256"}}; None when the checkpoint has none
    (written before rlsys wrote them). ValueError when it is not one rlsys wrote."""
    path = folder / CHECKSUMS
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{CHECKSUMS}: not a checksums file rlsys wrote ({type(e).__name__}: {e})") from None
    if not isinstance(files, dict):
        raise ValueError(f"{CHECKSUMS}: \"files\" is not a mapping of file names: {files!r:.80}")
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
            raise ValueError(f"{CHECKSUMS}: entry {name!r} is not {{size, sha256}}: {entry!r}")
    return files


def damage(folder: Path) -> list[str] | None:
    """What differs between checkpoint `folder`'s files and its checksums.json, one line per file
    (relative paths): empty when every file matches, None when there is no checksums.json."""
    try:
        recorded = read_checksums(folder)
    except ValueError as e:
        return [str(e)]
    if recorded is None:
        return None
    found = []
    for name, want in sorted(recorded.items()):
        path = folder / name
        if not path.is_file():
            found.append(f"{name}: missing ({CHECKSUMS} lists it, {want['size']} bytes)")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            how = "truncated" if size < want["size"] else "grown"
            found.append(f"{name}: {size} bytes, {CHECKSUMS} recorded {want['size']} ({how})")
        elif sha256_of(path) != want["sha256"]:
            found.append(f"{name}: sha256 differs from the one in {CHECKSUMS} (altered; same size, {size} bytes)")
    return found


def older_whole(folder: Path) -> str:
    """A sentence naming the newest checkpoint beside `folder` (a step_<N>) with a smaller step
    that can be resumed from and whose files match their checksums, or saying there is none."""
    step = folder.name.removeprefix("step_")
    if not step.isdigit():
        return f"{folder.name} is not a step_<N> folder: no older checkpoint beside it was looked for."
    older = sorted(((s, p) for s, p in steps_in(folder.parent).items()
                    if s < int(step) and (p / TRAINER_STATE).is_file()), reverse=True)
    for _, candidate in older:
        found = damage(candidate)
        if found is None:
            return (f"The newest older checkpoint is {candidate}, written before rlsys wrote checksums (it cannot be "
                    f"checked); resume from it with trainer.resume={candidate}")
        if not found:
            return (f"The newest older checkpoint whose checksums match is {candidate}; resume from it with "
                    f"trainer.resume={candidate}")
    return (f"No older checkpoint in {folder.parent} passes its checksums ({len(older)} looked at): start a new "
            f"run (without trainer.resume)")


def verify(folder: Path) -> None:
    """Checkpoint `folder`'s files against its checksums.json, before any actor starts: returns when
    every file matches (with a printed note when there are no checksums to check, or files the save
    did not write); otherwise raises DamagedCheckpoint naming each bad file, what is wrong with it,
    and the newest older checkpoint that is whole (or that there is none)."""
    t0 = time.time()
    found = damage(folder)
    if found is None:
        print(f"[rlsys] note: {folder} has no {CHECKSUMS} (written before rlsys wrote checksums): its files cannot "
              f"be checked before the resume", flush=True)
        return
    if found:
        raise DamagedCheckpoint(f"checkpoint {folder} is damaged: " + "; ".join(found) + ". " + older_whole(folder))
    recorded = read_checksums(folder)
    unlisted = sorted(set(checkpoint_files(folder)) - set(recorded))
    if unlisted:  # harmless to the resume: DeepSpeed and transformers read the files by the names the save wrote
        print(f"[rlsys] note: {folder} holds {len(unlisted)} file(s) its save did not write, not checked: "
              + ", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else ""), flush=True)
    size = sum(v["size"] for v in recorded.values())
    print(f"[rlsys] {folder.name}: {len(recorded)} files ({size / (1 << 20):.1f} MiB) match its {CHECKSUMS} "
          f"({time.time() - t0:.1f} s)", flush=True)


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


def rank_state_files(folder: Path, rank: int) -> list[str]:
    """The learner state files of checkpoint `folder` that learner rank `rank` reads, as names
    relative to the checkpoint: its own ZeRO partition and the files every rank reads (the module
    states, which under ZeRO-0 hold the whole model and optimizer)."""
    return rank_files(sorted(p.relative_to(folder).as_posix() for p in (folder / "learner").rglob("*")
                             if p.is_file()), rank)


def rank_files(names: list[str], rank: int) -> list[str]:
    """Of a checkpoint's files (relative names), those learner rank `rank` reads on resume.

    >>> rank_files(["config.json", "learner/s/mp_rank_00_model_states.safetensors",
    ...             "learner/s/zero_pp_rank_0_mp_rank_00_optim_states.safetensors",
    ...             "learner/s/zero_pp_rank_1_mp_rank_00_optim_states.safetensors"], 1)
    ['learner/s/mp_rank_00_model_states.safetensors', 'learner/s/zero_pp_rank_1_mp_rank_00_optim_states.safetensors']
    """
    out = []
    for name in names:
        owner = re.search(r"zero_pp_rank_(\d+)_", Path(name).name)
        if name.startswith("learner/") and (owner is None or int(owner.group(1)) == rank):
            out.append(name)
    return out


def file_chunks(folder: Path, names: list[str], chunk_bytes: int = 64 << 20) -> Iterator[tuple[str, int, bytes]]:
    """Files of `folder` as (relative name, byte offset, at most chunk_bytes bytes), read lazily:
    whoever consumes it holds one chunk at a time, never a whole file. An empty file is one empty
    chunk (it must still be made on the other side).

    >>> import tempfile; d = Path(tempfile.mkdtemp()); _ = (d / "a").write_bytes(b"12345"); _ = (d / "e").write_bytes(b"")
    >>> list(file_chunks(d, ["a", "e"], chunk_bytes=2))
    [('a', 0, b'12'), ('a', 2, b'34'), ('a', 4, b'5'), ('e', 0, b'')]
    """
    for name in names:
        with open(folder / safe_relative(name), "rb") as f:
            offset = 0
            while True:
                chunk = f.read(chunk_bytes)
                if chunk or offset == 0:
                    yield name, offset, chunk
                if len(chunk) < chunk_bytes:
                    break
                offset += len(chunk)


def write_chunk(folder: Path, name: str, offset: int, data: bytes) -> None:
    """Write one chunk of file_chunks at its offset under `folder` (the file made if missing):
    the chunks of a file may arrive in any order and still make the same file."""
    target = folder / safe_relative(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "r+b" if target.exists() else "wb") as f:
        f.seek(offset)
        f.write(data)


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
    # checksums.json too: it lists the files left out.
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("learner", TRAINER_STATE, CHECKSUMS))
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
