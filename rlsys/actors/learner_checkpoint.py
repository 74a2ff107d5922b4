"""A learner rank's checkpoint I/O: its part of a checkpoint written, resumed, uploaded or streamed.

A mixin of rlsys.actors.learner.Learner. Rank 0 writes the HF weights (safetensors, config,
tokenizer: transformers and vLLM load them); every rank its DeepSpeed state under learner/state/
(JSON + safetensors, rlsys.actors.state_tree: no pickle). Without shared storage the files travel
as chunks, never as one model-sized argument.
"""

from __future__ import annotations

import functools
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from rlsys.checkpoint import safe_relative, write_chunk

LEARNER_STATE, STATE_TAG = "learner", "state"
"""A checkpoint's DeepSpeed state lives in <checkpoint>/learner/state/ (one set of files per rank)."""


def resident(method):
    """Bring the rank's state back to its device (after `Learner.offload`) before `method` runs."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.offloaded:
            self.engine.reload_states()
            self.offloaded = False
        return method(self, *args, **kwargs)
    return wrapper


class CheckpointIO:
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every parameter, whole, on CPU, on rank 0 only (None on the others): the one full copy
        a save, an export or a check needs. Under ZeRO-3 every rank takes part in each gather, one
        parameter at a time, and only rank 0 keeps a copy; otherwise the parameters are whole on
        rank 0 already and the other ranks do nothing (no gather, no copy)."""
        import deepspeed

        zero3 = self.cfg.zero_stage == 3
        if not zero3 and self.rank != 0:
            return None
        out = {}
        for name, p in self._named_params():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=zero3):
                if self.rank == 0:  # ZeRO-3 frees the gathered storage on exit: copy it
                    out[name] = p.data.detach().to("cpu", copy=zero3)
        return out if self.rank == 0 else None

    @resident
    def save(self, folder: str, state: bool = True) -> None:
        """Write this rank's part of a checkpoint into `folder` (created if missing): rank 0 the HF
        weights (safetensors, config, tokenizer) that transformers and vLLM load directly; with
        `state`, every rank its DeepSpeed state under learner/ (optimizer, LR scheduler, update
        count, RNG). Collective. The caller writes into a temporary folder and renames it when whole
        (rlsys.checkpoint.commit): a reader never sees a half-written checkpoint."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        weights = self.full_state_dict()
        if weights is not None:
            self._write_hf(weights, out)
        del weights
        if state:
            self.engine.save_checkpoint(str(out / LEARNER_STATE), tag=STATE_TAG, save_latest=False,
                                        client_state={"rlsys": self._client_state()})
            # DeepSpeed's conversion scripts (zero_to_fp32.py, ...) read its pickles, not these files.
            for script in (out / LEARNER_STATE).glob("zero_to_*.py") if self.rank == 0 else []:
                script.unlink(missing_ok=True)

    @resident
    def load_state(self, folder: str) -> int:
        """Continue from a checkpoint written by `save`: weights, optimizer, LR scheduler, update
        count and RNG. Collective. Returns the number of batches trained so far."""
        path, client = self.engine.load_checkpoint(str(Path(folder) / LEARNER_STATE), tag=STATE_TAG,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None or "rlsys" not in client:
            raise FileNotFoundError(f"{folder}: no learner state for rank {self.rank} under {LEARNER_STATE}/")
        mine = client["rlsys"]
        self.steps = mine["steps"]
        torch.set_rng_state(mine["torch_rng"])
        random.setstate(mine["python_rng"])
        return self.steps

    @resident
    def upload_part(self, uri: str, rel: str, state: bool = True) -> dict[str, dict]:
        """This rank's part of a checkpoint straight to a storage URI (trainer.output_dir), never
        through the driver: written (`save`) to a temporary folder on this node, each file uploaded
        to `rel` under `uri` a chunk at a time (rlsys.cluster.storage.RunStorage.put), the folder
        removed. Returns {name relative to the checkpoint: {"size", "sha256"}} as uploaded: the
        driver writes them into the checkpoint's checksums.json. Collective (the save is)."""
        from rlsys.cluster.storage import RunStorage  # pyarrow only: no Ray comes with it

        with tempfile.TemporaryDirectory(prefix="rlsys-ckpt-") as tmp:
            self.save(tmp, state)
            storage = RunStorage(uri, Path(tmp))
            names = sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file())
            return {name: storage.put(Path(tmp) / name, f"{rel}/{name}") for name in names}

    def fetch_part(self, uri: str, rel: str, files: dict[str, dict], key: str) -> None:
        """Download `files` ({name relative to the checkpoint: its checksums.json entry}) of the
        checkpoint at `rel` under storage `uri` into this node's received folder `key` (as
        `receive_state_chunk` fills it), a chunk at a time, each file's size and sha256 checked:
        a mismatch stops the resume naming the file and the URI. Then `load_received_state`."""
        from rlsys.cluster.storage import RunStorage

        folder = self._received(key)
        storage = RunStorage(uri, folder)
        for name, want in files.items():
            storage.get(f"{rel}/{name}", folder / safe_relative(name), want)

    def receive_state_chunk(self, key: str, name: str, offset: int, data: bytes) -> None:
        """One chunk of a checkpoint's state file (rlsys.checkpoint.file_chunks), for a rank that
        cannot read the run folder: written at its offset into the node's temporary folder `key`
        (one per resume, shared by this node's ranks: a file several of them read, the module
        states, arrives once per node). A chunk at a time, never a whole file, so neither the
        driver nor the object store ever holds a model-sized argument."""
        write_chunk(self._received(key), name, offset, data)

    def load_received_state(self, key: str, sizes: dict[str, int]) -> int:
        """`load_state` from the node's received folder `key`, once each file this rank reads has
        its size in `sizes` (relative name: bytes, as the driver read them). Collective."""
        folder = self._received(key)
        got = {name: (folder / name).stat().st_size if (folder / name).is_file() else None for name in sizes}
        wrong = sorted(name for name in sizes if got[name] != sizes[name])
        if wrong:
            raise RuntimeError(f"learner {self.rank}: the state files received into {folder} differ from the "
                               f"checkpoint's: " + ", ".join(f"{n}: {got[n]} bytes, expected {sizes[n]}"
                                                            for n in wrong[:5]))
        return self.load_state(str(folder))

    def drop_received_state(self, key: str) -> None:
        """The node's received folder `key` goes, once every rank on the node has loaded from it."""
        folder = self._received(key)
        if folder.exists():
            shutil.rmtree(folder)

    @staticmethod
    def _received(key: str) -> Path:
        assert key.startswith("rlsys-resume-") and "/" not in key, f"not a received-state folder name: {key!r}"
        return Path(tempfile.gettempdir()) / key

    def _client_state(self) -> dict:
        """What DeepSpeed does not keep: the update count (it seeds each update's shuffle) and the
        RNG states (plain types: rlsys.actors.state_tree writes them)."""
        return {"steps": self.steps, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}

    def save_files(self, state: bool = True, chunk_bytes: int = 64 << 20) -> Iterator[tuple[str, bytes]]:
        """The same checkpoint for a driver on another node without shared storage: this rank
        writes its part (`save`) to a local temporary folder and streams the files back as
        (relative name, chunk) pairs (a Ray streaming generator: a chunk at a time in flight, never
        the whole model in the object store); the driver writes them into the run folder
        (rlsys.checkpoint.receive). A rank with nothing to write (not rank 0, no state, ZeRO 0-2)
        yields nothing."""
        with tempfile.TemporaryDirectory(prefix="rlsys-ckpt-") as tmp:
            self.save(tmp, state)
            for file in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
                name = file.relative_to(tmp).as_posix()
                with open(file, "rb") as f:
                    while chunk := f.read(chunk_bytes):
                        yield name, chunk
                yield name, b""  # end of this file (an empty file is one empty chunk)

    def _write_hf(self, state: dict[str, torch.Tensor], folder: Path) -> None:
        from transformers import AutoTokenizer

        self.engine.module.save_pretrained(folder, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(folder)
