"""A run folder on storage named by a URI (s3://, gs://, hdfs://, file://...), through pyarrow.fs.

A run whose trainer.output_dir is a URI is written to a local staging folder as usual and copied
to the URI as it grows. The API, for the training loop:

    if is_uri(cfg.trainer.output_dir):
        storage = RunStorage(cfg.trainer.output_dir, staging_dir)
        if storage.holds_run():          # before any actor starts: never mix or overwrite runs
            raise FileExistsError(...)
        ...
        storage.upload()                 # after each step (metrics, samples, new checkpoints)
        ...
        storage.upload()                 # once more at the end (also after a crash, in `finally`)

`upload()` copies every file under the local folder that is new or changed since its previous
call (size or mtime differ) to the same relative path under the URI, and returns the relative
paths it copied. metrics.jsonl and samples.jsonl grow every step and are copied again whole each
time; a checkpoint's files are copied once. Anything whose path has a part containing ".partial"
is skipped: checkpoints are written under a .partial name and renamed when complete, so a
checkpoint is uploaded only once it is whole. A file is stat'ed before it is read: one that grows
while it is being copied is copied again by the next call.

How a file lands: on filesystems with a real rename (local/file://, hdfs, ...) it is written under
a temporary name beside its destination and moved over it, so a reader never sees half a file.
Object stores (s3, gcs) have no rename (pyarrow's move is a copy and a delete there), but an
object becomes visible only when its upload completes, whole: there files are written directly.
A failed copy raises StorageError naming the file and the URI; nothing is recorded as sent then,
so the next call tries that file again.

Credentials are pyarrow's usual ones (AWS_* / the instance role for s3, Google application
default credentials for gs).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Filesystems where an object appears whole when its upload completes and move() is a copy.
OBJECT_STORES = ("s3", "gcs")
CHUNK = 8 << 20


class StorageError(OSError):
    pass


def open_run_storage(output_dir: str, resume: str, staging: Path) -> "RunStorage | None":
    """The storage a run whose trainer.output_dir is a URI is copied to (None for a plain path),
    checked before any actor starts: trainer.resume=auto cannot read a URI's checkpoints, and a URI
    that holds a run already is never mixed with or overwritten by another (`rlsys train`, `rlsys sft`)."""
    from rlsys.config import ConfigError

    if not is_uri(output_dir):
        return None
    if resume == "auto":
        raise ConfigError(f"trainer.resume=auto reads the run folder, and trainer.output_dir={output_dir} is a "
                          f"storage URI: copy the run's checkpoint folder to local disk and give it as "
                          f"trainer.resume=PATH (the run continues into a new trainer.output_dir)")
    storage = RunStorage(output_dir, staging)
    if storage.holds_run():
        raise FileExistsError(f"trainer.output_dir={output_dir} already holds a run (metrics.jsonl); choose another "
                              f"trainer.output_dir")
    return storage


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
        try:
            info = self.fs.get_file_info(f"{self.root}/metrics.jsonl")
        except OSError as e:
            raise StorageError(f"cannot read {self.uri}/metrics.jsonl: {e}") from e
        return info.type == pafs.FileType.File

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
        """Copy what is new or changed to the URI; returns the relative paths copied."""
        copied = []
        for rel, path, stamp in self.pending():
            self._put(path, rel)
            self._sent[rel] = stamp
            copied.append(rel)
        return copied

    def _put(self, path: Path, rel: str) -> None:
        dest = f"{self.root}/{rel}"
        target = dest if self.atomic_put else f"{dest}.partial-{uuid.uuid4().hex[:8]}"
        try:
            if not self.atomic_put:  # object stores have no folders to make
                self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            with open(path, "rb") as src, self.fs.open_output_stream(target) as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
            if target != dest:
                self.fs.move(target, dest)
        except OSError as e:  # pyarrow reports permission, network and missing-bucket errors as OSError
            if target != dest:
                try:
                    self.fs.delete_file(target)
                except OSError:
                    pass  # the temporary file may not exist (the open failed); the original error is what matters
            raise StorageError(f"uploading {path} to {self.uri}/{rel} failed: {e}") from e
