"""The learner group as the driver sees it: DeepSpeed ranks placed together, each sent only its
rows of a batch, saving and resuming every rank's part of a checkpoint wherever the ranks run.

`start_learner_group` starts one alone (`rlsys sft`, benchmarks); `rlsys.cluster.groups.launch`
starts it beside the generators and reward workers of a GRPO run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import ray
from ray.util.placement_group import remove_placement_group

from rlsys import checkpoint
from rlsys.cluster.deadlines import get_all
from rlsys.cluster.placement import layout, resolve_backend
from rlsys.cluster.remote import LearnerActor, in_group, place, threads
from rlsys.config import Config
from rlsys.data.models import ModelSource
from rlsys.math.packing import cut
from rlsys.types import TrainBatch


class LearnerGroup:
    def __init__(self, actors: list, cfg: Config, ship_checkpoints: bool = False):
        """ship_checkpoints: rank 0 streams checkpoint files to the driver, which writes them
        (rank 0 on another node than the driver, no shared storage)."""
        self.actors = actors
        self.cfg = cfg
        self.trained = 0
        """Updates the group has taken (batches trained): the next shard is cut for this update."""
        self.ship_checkpoints = ship_checkpoints
        self.deadlines = cfg.deadlines
        self.names = [f"learner {i}" for i in range(len(actors))]
        self.shape = None  # the model's dimensions (rlsys.math.flops.Shape), asked of rank 0 at the first cut

    def _all(self, refs: list, phase: str, timeout_s: float, setting: str) -> list:
        """Every rank's result; a rank that dies raises ActorLost at once (its peers would wait
        in a collective), a phase past its deadline PhaseTimeout."""
        return get_all(refs, self.names, phase, timeout_s, setting)

    def train(self, batch: TrainBatch) -> dict[str, float]:
        """One GRPO update on a rollout batch."""
        return self._update(batch, "train")

    def train_sft(self, batch: TrainBatch) -> dict[str, float]:
        """One supervised step on one mini-batch of examples (rlsys.math.sft)."""
        return self._update(batch, "train_sft")

    def _update(self, batch: TrainBatch, method: str) -> dict[str, float]:
        """The batch is cut here and each rank is sent only its rows (rlsys.math.packing), to the
        ranks' `method`; rank 0's metrics (reduced over the ranks) come back."""
        W = len(self.actors)
        if self.shape is None:
            self.shape = self._all([self.actors[0].model_shape.remote()], "model shape", self.deadlines.train_s,
                                   "deadlines.train_s")[0]
        shards = [cut(batch, rank, W, self.cfg.learner, self.cfg.algo, self.cfg.trainer.seed, self.trained, self.shape)
                  for rank in range(W)]
        out = self._all([getattr(a, method).remote(shard) for a, shard in zip(self.actors, shards)], "train",
                        self.deadlines.train_s, "deadlines.train_s")[0]
        self.trained += 1
        return out

    def shutdown(self, placement) -> None:
        """A group started alone (start_learner_group): its actors and their placement group go."""
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(placement)

    def full_state_dict(self) -> dict:
        return self._all([a.full_state_dict.remote() for a in self.actors], "gather", self.deadlines.save_s,
                         "deadlines.save_s")[0]

    def save(self, folder: Path, state: bool = True) -> None:
        """Every rank's part of a checkpoint (rlsys.actors.learner.Learner.save) into `folder`
        (absolute, in the run folder), whatever node rank 0 runs on."""
        if not self.ship_checkpoints:
            self._all([a.save.remote(str(folder), state) for a in self.actors], "save", self.deadlines.save_s,
                      "deadlines.save_s")
            # cluster.shared_storage=true on a path that is not shared: rank 0 wrote the checkpoint
            # to its own node's disk, and the run would end "successfully" without it. A few
            # seconds' grace for shared filesystems that cache a missing name briefly.
            deadline = time.time() + 10
            while not (folder / "config.json").is_file():
                if time.time() > deadline:
                    raise RuntimeError(
                        f"learner rank 0 wrote checkpoint {folder}, but the driver does not see it: with "
                        f"cluster.shared_storage=true the run folder must be on storage that every node "
                        f"mounts at the same path (the checkpoint is on rank 0's node's local disk). Use "
                        f"cluster.shared_storage=false to have checkpoints sent to the driver")
                time.sleep(0.5)
            return
        # Backpressure: each rank is at most two chunks ahead of the driver's writes. The ranks
        # write their files at once (DeepSpeed's save is collective); the driver reads them in turn.
        streams = [a.save_files.options(_generator_backpressure_num_objects=2).remote(state) for a in self.actors]
        for stream in streams:
            checkpoint.receive((ray.get(ref) for ref in stream), folder)
        if not (folder / "config.json").is_file():
            raise RuntimeError(f"learner rank 0 streamed checkpoint {folder} without config.json")

    def load_state(self, folder: Path) -> int:
        """Every rank continues from checkpoint `folder`; returns the number of batches trained. Ranks
        that cannot read the run folder (shipped checkpoints) are sent the files they read."""
        if not self.ship_checkpoints:
            refs = [a.load_state.remote(str(folder)) for a in self.actors]
        else:
            refs = [a.load_state_files.remote(checkpoint.state_files(folder, rank)) for rank, a in enumerate(self.actors)]
        counts = self._all(refs, "resume", self.deadlines.save_s, "deadlines.save_s")
        assert len(set(counts)) == 1, f"learner ranks resumed at different update counts: {counts}"
        self.trained = counts[0]
        return counts[0]


def start_learner_group(cfg: Config, model_path: str, updates: int | None = None) -> tuple[LearnerGroup, object]:
    """A learner group alone, set up and ready to train (`rlsys sft`, benchmarks); returns it and
    its placement group. updates: optimizer steps in the run (the LR schedule's length; None: a
    GRPO run's, from trainer.total_steps)."""
    backend = resolve_backend(cfg.cluster.backend, ray.cluster_resources())
    lay = layout(dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, placement="any")),
                 backend == "nccl")
    pg = place("rlsys-learners", *lay.groups["rlsys-learners"], cfg.cluster)
    actors = learner_actors(cfg, ModelSource.of(cfg.model, model_path), backend, lay, {"rlsys-learners": pg}, updates)
    ip = ray.get(actors[0].whereami.remote())["ip"]
    port = ray.get(actors[0].free_port.remote())
    ray.get([a.setup.remote(ip, port) for a in actors])
    return LearnerGroup(actors, cfg), pg


def learner_actors(cfg: Config, model: ModelSource, backend: str, lay, pgs: dict, updates: int | None = None) -> list:
    per_batch = None  # a given count (SFT) has no rollout batches
    if updates is None:
        per_batch = cfg.learner.epochs * (cfg.rollout_batch_size // cfg.learner.mini_batch_size)
        updates = cfg.trainer.total_steps * per_batch
    return [LearnerActor.options(num_cpus=s.num_cpus, num_gpus=s.num_gpus, **in_group(pgs[s.group], s.bundle),
                                 runtime_env={"env_vars": threads(s.num_cpus)}).remote(
        model, cfg.model.dtype, cfg.learner, cfg.algo, cfg.generator.temperature,
        s.rank, cfg.learner.num_ranks, backend, cfg.trainer.seed, updates, per_batch)
        for s in lay.of("learner")]
