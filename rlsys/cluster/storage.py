"""A run folder on storage named by a URI (s3://, gs://, hdfs://, file://...), through pyarrow.fs.

A run whose trainer.output_dir is a URI writes the driver's files (logs, trainer state,
checksums) to a local staging folder as usual and copies them to the URI as it grows; the
learner ranks put their checkpoint parts there themselves (below). The API, for the loops:

    storage = open_run_storage(cfg.trainer.output_dir, cfg.trainer.resume, staging_dir)
    # None for a plain path; refuses a URI that holds a run unless trainer.resume=auto
    resume_from = resume_point(cfg, staging_dir, storage)   # auto: RunStorage.fetch_resumable
    ...
    learner.save(folder, storage=storage)    # in commit's write: the ranks upload their parts
    storage.upload()                         # after each step (logs, the driver's checkpoint files)
    ...
    storage.upload()                         # once more at the end (also after a crash, in `finally`)

`upload()` copies every file under the local folder that is new or changed since its previous
call (size or mtime differ) to the same relative path under the URI, and returns the relative
paths it copied. metrics.jsonl and samples.jsonl grow every step and are copied again whole each
time; a checkpoint's (driver's) files are copied once. Anything whose path has a part containing ".partial"
is skipped: checkpoints are written under a .partial name and renamed when complete, so a
checkpoint is uploaded only once it is whole. A file is stat'ed before it is read: one that grows
while it is being copied is copied again by the next call.

How a file lands: on filesystems with a real rename (local/file://, hdfs, ...) it is written under
a temporary name beside its destination and moved over it, so a reader never sees half a file.
Object stores (s3, gcs) have no rename (pyarrow's move is a copy and a delete there), but an
object becomes visible only when its upload completes, whole: there files are written directly.
A failed copy raises StorageError naming the file and the URI; nothing is recorded as sent then,
so the next call tries that file again.

Checkpoints go straight from the learner ranks to the URI (`put`, on each rank's node): every
rank writes its part to a node-local folder and uploads its own files, recording each one's size
and sha256 as it streams it; the driver merges those records with its own files' into the
checkpoint's checksums.json (rlsys.checkpoint.commit). The driver uploads only its own files
(trainer_state.json, checksums.json, the logs), and `upload` sends every checksums.json after the
other files and `latest` after everything: a checkpoint on the storage is whole once its
checksums.json is there, and `latest` never names one that is not. Before the ranks upload a
step, whatever a killed earlier save left at that step is removed (`remove`).

A resume (trainer.resume=auto, `fetch_resumable`) reads the small files through the driver (the
logs, `latest`, trainer_state.json, checksums.json) into the staging folder, checks that every
file checksums.json lists is on the storage at its recorded size (`check_sizes`; not its sha256:
that would read every byte through the driver), and each learner rank then downloads its own files
(`get`, chunk by chunk, sha256 checked) to its node (rlsys.cluster.learners.LearnerGroup.load_state).

Credentials are pyarrow's usual ones (AWS_* / the instance role for s3, Google application
default credentials for gs).
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from rlsys.checkpoint import CHECKSUMS, TRACKER, TRAINER_STATE, DamagedCheckpoint, read_checksums

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Filesystems where an object appears whole when its upload completes and move() is a copy.
OBJECT_STORES = ("s3", "gcs")
CHUNK = 8 << 20


class StorageError(OSError):
    pass


def open_run_storage(output_dir: str, resume: str, staging: Path) -> "RunStorage | None":
    """The storage a run whose trainer.output_dir is a URI is copied to (None for a plain path),
    checked before any actor starts: a URI that holds a run already is never mixed with or
    overwritten by another (`rlsys train`, `rlsys sft`), only continued (trainer.resume=auto)."""
    if not is_uri(output_dir):
        return None
    storage = RunStorage(output_dir, staging)
    if resume != "auto" and storage.holds_run():
        raise FileExistsError(f"trainer.output_dir={output_dir} already holds a run (metrics.jsonl); choose another "
                              f"trainer.output_dir")
    return storage


def copy_hashed(src, out) -> dict:
    """Copy stream `src` to stream `out` a chunk at a time; returns what passed as a checksums.json
    entry, {"size", "sha256"} (an upload and a download both record what they moved)."""
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(CHUNK):
        out.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def is_uri(text: str) -> bool:
    """A storage URI with a scheme (s3://bucket/x, gs://..., hdfs://..., file:///abs), not a path.

    >>> is_uri("s3://bucket/runs/a"), is_uri("file:///tmp/run"), is_uri("/tmp/run"), is_uri("runs/a")
    (True, True, False, False)
    """
    return bool(_SCHEME.match(text))


class RunStorage:
    """The run folder `local` mirrored to `uri` (see the module docstring)."""

    def __init__(self, uri: str, local: Path):
        if not is_uri(uri):
            raise StorageError(f"{uri!r} is not a storage URI (scheme://...)")
        self.uri = uri.rstrip("/")
        self.local = Path(local)
        try:
            self.fs, root = pafs.FileSystem.from_uri(self.uri)
        except (OSError, ValueError) as e:  # pyarrow: unknown scheme, no credentials, bad bucket
            raise StorageError(f"cannot open storage {self.uri}: {e}") from e
        self.root = root.rstrip("/")
        self.atomic_put = self.fs.type_name in OBJECT_STORES
        self._sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) when copied

    def holds_run(self) -> bool:
        """metrics.jsonl exists at the URI: a run was (or is being) written there."""
        return self.exists("metrics.jsonl")

    def pending(self) -> list[tuple[str, Path, tuple[int, int]]]:
        """(relative path, local file, (size, mtime_ns)) of every file new or changed since it was sent."""
        out = []
        for folder, dirs, files in os.walk(self.local):
            dirs[:] = sorted(d for d in dirs if ".partial" not in d)  # a checkpoint still being written
            for name in sorted(files):
                if ".partial" in name:
                    continue
                path = Path(folder) / name
                st = path.stat()
                rel = path.relative_to(self.local).as_posix()
                if self._sent.get(rel) != (st.st_size, st.st_mtime_ns):
                    out.append((rel, path, (st.st_size, st.st_mtime_ns)))
        return out

    def upload(self) -> list[str]:
        """Copy what is new or changed to the URI; returns the relative paths copied. Every
        checksums.json goes after the other files, `latest` last: neither is on the storage before
        what it vouches for (see the module docstring)."""
        copied = []
        order = lambda item: (Path(item[0]).name == TRACKER, Path(item[0]).name == CHECKSUMS)  # noqa: E731
        for rel, path, stamp in sorted(self.pending(), key=order):  # sorted() is stable: walk order otherwise
            self.put(path, rel)
            self._sent[rel] = stamp
            copied.append(rel)
        return copied

    def put(self, path: Path, rel: str) -> dict:
        """Copy local file `path` to `rel` under the URI, a chunk at a time; returns its
        {"size", "sha256"} as sent (a checksums.json entry)."""
        dest = f"{self.root}/{rel}"
        target = dest if self.atomic_put else f"{dest}.partial-{uuid.uuid4().hex[:8]}"
        try:
            if not self.atomic_put:  # object stores have no folders to make
                self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            with open(path, "rb") as src, self.fs.open_output_stream(target) as out:
                sent = copy_hashed(src, out)
            if target != dest:
                self.fs.move(target, dest)
        except OSError as e:  # pyarrow reports permission, network and missing-bucket errors as OSError
            if target != dest:
                try:
                    self.fs.delete_file(target)
                except OSError:
                    pass  # the temporary file may not exist (the open failed); the original error is what matters
            raise StorageError(f"uploading {path} to {self.uri}/{rel} failed: {e}") from e
        return sent

    def get(self, rel: str, dest: Path, want: dict | None = None) -> dict:
        """Download `rel` under the URI to local file `dest`, a chunk at a time, under a temporary
        name renamed when whole; returns its {"size", "sha256"}. want: the checksums.json entry it
        must match, else StorageError naming the file and the URI (nothing is left at `dest`).
        A file fetched into the staging folder counts as sent (it is what the storage holds)."""
        src = f"{self.uri}/{rel}"
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            with self.fs.open_input_stream(f"{self.root}/{rel}") as f, open(tmp, "wb") as out:
                got = copy_hashed(f, out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"downloading {src} to {dest} failed: {e}") from e
        size = got["size"]
        if want is not None and got != {"size": want["size"], "sha256": want["sha256"]}:
            tmp.unlink()
            what = (f"{size} bytes, {CHECKSUMS} recorded {want['size']}" if size != want["size"]
                    else f"sha256 differs from the one in {CHECKSUMS} (same size, {size} bytes)")
            raise StorageError(f"{src} is damaged: {what}; the resume stops")
        os.replace(tmp, dest)
        if dest.resolve() == (self.local / rel).resolve():
            st = dest.stat()
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
        return got

    def exists(self, rel: str) -> bool:
        """A file `rel` under the URI."""
        try:
            return self.fs.get_file_info(f"{self.root}/{rel}").type == pafs.FileType.File
        except OSError as e:
            raise StorageError(f"cannot read {self.uri}/{rel}: {e}") from e

    def read_text(self, rel: str) -> str | None:
        """A small file under the URI as text; None when there is none."""
        if not self.exists(rel):
            return None
        try:
            with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
                return f.read().decode()
        except OSError as e:
            raise StorageError(f"cannot read {self.uri}/{rel}: {e}") from e

    def remove(self, rel: str) -> None:
        """Folder `rel` under the URI and everything in it, if it is there."""
        try:
            if self.fs.get_file_info(f"{self.root}/{rel}").type == pafs.FileType.Directory:
                self.fs.delete_dir(f"{self.root}/{rel}")
        except OSError as e:
            raise StorageError(f"cannot remove {self.uri}/{rel}: {e}") from e

    def remote_path(self, folder: Path) -> str | None:
        """Where checkpoint `folder` of the staging folder is on the storage (relative to the URI;
        a `.partial` folder by the name commit renames it to); None for a folder outside the
        staging folder (a checkpoint given as trainer.resume=PATH: not on the storage)."""
        folder = Path(folder).resolve()
        if not folder.is_relative_to(self.local.resolve()):
            return None
        rel = folder.relative_to(self.local.resolve()).as_posix()
        return rel.removesuffix(".partial")

    def fetch_resumable(self) -> Path:
        """trainer.resume=auto at a URI: the checkpoint `latest` names, its small files (trainer
        state, checksums.json) and the run's logs fetched into the staging folder (the logs are
        cut back and appended to, then uploaded whole, as a local resume does). Returns the local
        copy of the checkpoint folder (its learner files stay on the storage: each rank fetches
        its own, rlsys.cluster.learners.LearnerGroup.load_state). Raises FileNotFoundError when
        the URI holds no whole checkpoint, DamagedCheckpoint when a listed file is missing or has
        another size (checked here, before any actor starts)."""
        named = (self.read_text(f"checkpoints/{TRACKER}") or "").strip()
        if not named:
            raise FileNotFoundError(f"trainer.resume=auto: {self.uri} holds no whole checkpoint to continue from (no "
                                    f"checkpoints/{TRACKER}). Start a new run without trainer.resume in another "
                                    f"trainer.output_dir")
        rel = f"checkpoints/{named}"
        folder = self.local / rel
        if not self.exists(f"{rel}/{CHECKSUMS}"):  # `latest` is uploaded after it: never expected
            raise DamagedCheckpoint(f"{self.uri}/checkpoints/{TRACKER} names {named}, which has no {CHECKSUMS} on the "
                                    f"storage: it is not whole; give trainer.resume a local copy of an older one")
        self.get(f"{rel}/{CHECKSUMS}", folder / CHECKSUMS)
        try:
            listed = read_checksums(folder)
        except ValueError as e:
            raise DamagedCheckpoint(f"{self.uri}/{rel}/{e}") from None
        self.check_sizes(rel, listed)
        if TRAINER_STATE not in listed:
            raise DamagedCheckpoint(f"{self.uri}/{rel}: its {CHECKSUMS} lists no {TRAINER_STATE}: not a resumable "
                                    f"checkpoint")
        self.get(f"{rel}/{TRAINER_STATE}", folder / TRAINER_STATE, listed[TRAINER_STATE])
        for log in ("metrics.jsonl", "samples.jsonl", "pool.jsonl"):
            if self.exists(log):  # small: the driver appends to them
                self.get(log, self.local / log)
        return folder

    def check_sizes(self, rel: str, listed: dict[str, dict]) -> None:
        """Every file checksums.json lists under `rel` is on the storage with its recorded size,
        else DamagedCheckpoint naming each file that is not. Sizes only: their sha256 would read
        every byte of every rank's part through the driver; each rank checks the sha256 of the
        files it downloads (`get`), so damage of the same size still stops the resume there."""
        names = sorted(listed)
        try:
            infos = self.fs.get_file_info([f"{self.root}/{rel}/{name}" for name in names])
        except OSError as e:
            raise StorageError(f"cannot list {self.uri}/{rel}: {e}") from e
        bad = []
        for name, info in zip(names, infos):
            want = listed[name]["size"]
            if info.type != pafs.FileType.File:
                bad.append(f"{name}: missing ({CHECKSUMS} lists it, {want} bytes)")
            elif info.size != want:
                bad.append(f"{name}: {info.size} bytes, {CHECKSUMS} recorded {want} "
                           f"({'truncated' if info.size < want else 'grown'})")
        if bad:
            raise DamagedCheckpoint(f"checkpoint {self.uri}/{rel} is damaged: " + "; ".join(bad))
