"""The learner group as the driver sees it: DeepSpeed ranks placed together, each sent only its
rows of a batch, saving and resuming every rank's part of a checkpoint wherever the ranks run.

`start_learner_group` starts one alone (`rlsys sft`, benchmarks); `rlsys.cluster.groups.launch`
starts it beside the generators and reward workers of a GRPO run.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ray
from ray.util.placement_group import remove_placement_group

from rlsys import checkpoint
from rlsys.cluster.deadlines import PhaseTimeout, get_all
from rlsys.cluster.placement import layout, resolve_backend
from rlsys.cluster.remote import LearnerActor, in_group, place, threads
from rlsys.cluster.storage import RunStorage, is_uri
from rlsys.config import Config, model_dtype
from rlsys.data.models import ModelSource
from rlsys.math.packing import cut
from rlsys.types import TrainBatch


class LearnerGroup:
    def __init__(self, actors: list, cfg: Config, ship_checkpoints: bool = False, offloads: bool = False):
        """ship_checkpoints: True sends every rank's part of a checkpoint through the driver
        whatever node it runs on; False: decided per rank (`ships`). offloads: `offload` moves the
        ranks' state to host memory (learner.offload_states, resolved: rlsys.config.offload_states)."""
        self.actors = actors
        self.offloads = offloads
        self.cfg = cfg
        self.trained = 0
        """Updates the group has taken (batches trained): the next shard is cut for this update."""
        self.ship_all = ship_checkpoints
        self._ships: list[bool] | None = None
        self.nodes: list[str] = []  # each rank's node id, found with `ships`
        self.deadlines = cfg.deadlines
        self.names = [f"learner {i}" for i in range(len(actors))]
        self.shape = None  # the model's dimensions (rlsys.math.flops.Shape), asked of rank 0 at the first cut

    def ships(self) -> list[bool]:
        """Per rank: whether its part of a checkpoint travels through the driver (`shipping`),
        asked of the ranks once (where they run)."""
        if self._ships is None:
            where = self._all([a.whereami.remote() for a in self.actors], "where", self.deadlines.start_s,
                              "deadlines.start_s")
            driver = ray.get_runtime_context().get_node_id()
            self.nodes = [w["node_id"] for w in where]
            self._ships = [True] * len(self.actors) if self.ship_all else shipping(
                self.nodes, driver, self.cfg.cluster.shared_storage)
            if is_uri(self.cfg.trainer.output_dir):
                print(f"[rlsys] trainer.output_dir={self.cfg.trainer.output_dir} is a storage URI: every learner "
                      f"rank uploads its own checkpoint part there and reads it from there on trainer.resume=auto",
                      flush=True)
            elif any(self._ships) and not self.ship_all:  # forced: the caller has said why
                ranks = [r for r, s in enumerate(self._ships) if s]
                print(f"[rlsys] learner rank(s) {ranks} run on other nodes than the driver ({driver[:12]}), no "
                      f"cluster.shared_storage: their checkpoint parts are streamed to the driver, which writes "
                      f"them into the run folder, and streamed back to them on resume", flush=True)
        return self._ships

    def _all(self, refs: list, phase: str, timeout_s: float, setting: str) -> list:
        """Every rank's result; a rank that dies raises ActorLost at once (its peers would wait
        in a collective), a phase past its deadline PhaseTimeout."""
        return get_all(refs, self.names, phase, timeout_s, setting)

    def offload(self) -> None:
        """Every rank's optimizer state, master weights and gradients to host memory while engines
        sharing its GPU receive and generate; back before the ranks' next update or save
        (rlsys.actors.learner.Learner.offload). Nothing unless learner.offload_states is on."""
        if self.offloads:
            self._all([a.offload.remote() for a in self.actors], "offload", self.deadlines.train_s, "deadlines.train_s")

    def train(self, batch: TrainBatch) -> dict[str, float]:
        """One GRPO update on a rollout batch."""
        return self._update(batch, "train")

    def train_profiled(self, batch: TrainBatch) -> tuple[dict[str, float], dict[str, float], float]:
        """One GRPO update under torch.profiler (rlsys.actors.learner.Learner.train_profiled): rank
        0's metrics, op self seconds and wall seconds."""
        return self._update(batch, "train_profiled")

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
        shards = [cut(batch, rank, W, self.cfg.learner, self.cfg.algo, self.cfg.trainer.seed, self.trained, self.shape,
                      grpo=method != "train_sft") for rank in range(W)]
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

    def save(self, folder: Path, state: bool = True, storage: RunStorage | None = None) -> dict[str, dict]:
        """Every rank's part of a checkpoint (rlsys.actors.learner_checkpoint.CheckpointIO.save) into `folder`
        (absolute, in the run folder), whatever node each rank runs on: a rank that sees the run
        folder writes its part there itself; the others write theirs to their own disk and stream it
        to the driver, which writes it (`ships`). With `storage` (trainer.output_dir is a URI)
        every rank uploads its part there itself instead (`upload_part`); returns the checksums.json
        entries of the files the ranks uploaded ({} without storage)."""
        if storage is not None:
            return self._upload(folder, state, storage)
        ships = self.ships()
        # Submitted together: DeepSpeed's save is collective. A streaming rank is at most two
        # chunks ahead of the driver's writes (backpressure); the driver reads the streams in turn.
        direct = [(r, a.save.remote(str(folder), state)) for r, a in enumerate(self.actors) if not ships[r]]
        streams = [(r, a.save_files.options(_generator_backpressure_num_objects=2).remote(state))
                   for r, a in enumerate(self.actors) if ships[r]]
        for rank, stream in streams:
            checkpoint.receive(self._streamed(stream, rank), folder)
        get_all([ref for _, ref in direct], [self.names[r] for r, _ in direct], "save", self.deadlines.save_s,
                "deadlines.save_s")
        if ships[0]:
            if not (folder / "config.json").is_file():
                raise RuntimeError(f"learner rank 0 streamed checkpoint {folder} without config.json")
            return {}
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
        return {}

    def _upload(self, folder: Path, state: bool, storage: RunStorage) -> dict[str, dict]:
        """Every rank's part straight to the storage, at the name `folder` gets when whole. What an
        earlier save of this step left there goes first: a checkpoint on the storage is whole once
        its checksums.json is there (the driver uploads it after this returns), so an old one must
        not vouch for a mix of old and new files."""
        rel = storage.remote_path(folder)
        assert rel is not None, f"{folder} is not in the staging folder {storage.local} of {storage.uri}"
        storage.remove(rel)
        t0 = time.time()
        parts = self._all([a.upload_part.remote(storage.uri, rel, state) for a in self.actors], "save",
                          self.deadlines.save_s, "deadlines.save_s")
        files = {name: entry for part in parts for name, entry in part.items()}
        assert len(files) == sum(map(len, parts)), f"learner ranks uploaded files of the same name to {rel}"
        if "config.json" not in files:
            raise RuntimeError(f"learner rank 0 uploaded checkpoint {storage.uri}/{rel} without config.json")
        print(f"[rlsys] {Path(rel).name}: learner ranks {[r for r, p in enumerate(parts) if p]} uploaded their parts "
              f"({len(files)} files, {sum(e['size'] for e in files.values()) / 2**20:.1f} MiB) to {storage.uri} "
              f"themselves in {time.time() - t0:.1f}s", flush=True)
        return files

    def load_state(self, folder: Path, chunk_bytes: int = 64 << 20, storage: RunStorage | None = None) -> int:
        """Every rank continues from checkpoint `folder`; returns the number of batches trained. A
        rank that sees the run folder reads its files there. The files of ranks that do not
        (`ships`: rlsys.checkpoint.rank_state_files, a rank's own ZeRO partition and the module
        states) are sent to their nodes chunk by chunk, at most two chunks in flight, one rank
        after another, each file once per node (`deliveries`): the driver never holds more than two
        chunks, never a whole file. Then every rank loads at once (the load is collective) and the
        received folders go. With `storage`, when `folder` is the staging copy of a checkpoint on
        it (RunStorage.fetch_resumable: trainer state and checksums.json only), every rank
        downloads the files it reads from the storage itself instead, sha256 checked
        (`fetch_part`), each file once per node; none of them passes through the driver."""
        rel = storage.remote_path(folder) if storage is not None else None
        listed = checkpoint.read_checksums(folder) if rel is not None else None
        assert rel is None or listed is not None, f"{folder}: a checkpoint fetched from {storage.uri} has no checksums"
        ships = self.ships()  # also finds each rank's node
        ships = ships if listed is None else [True] * len(self.actors)
        key = f"rlsys-resume-{uuid.uuid4().hex[:12]}"
        wanted = [checkpoint.rank_files(sorted(listed), rank) if listed is not None
                  else checkpoint.rank_state_files(folder, rank) if ship else [] for rank, ship in enumerate(ships)]
        plan = deliveries(ships, self.nodes, wanted)
        first_on_node = {}
        for rank in plan:
            first_on_node.setdefault(self.nodes[rank], rank)
        try:
            if listed is None:
                self._send(folder, plan, wanted, key, chunk_bytes)
            else:
                self._fetch(storage.uri, rel, listed, plan, key)
            sizes = {rank: {name: listed[name]["size"] if listed is not None else (folder / name).stat().st_size
                            for name in wanted[rank]} for rank in plan}
            refs = [a.load_received_state.remote(key, sizes[r]) if ships[r] else a.load_state.remote(str(folder))
                    for r, a in enumerate(self.actors)]
            counts = self._all(refs, "resume", self.deadlines.save_s, "deadlines.save_s")
        finally:  # on a failure too (not waited for then: the resume's own error is the one to see)
            drops = [self.actors[r].drop_received_state.remote(key) for r in first_on_node.values()]
        get_all(drops, [self.names[r] for r in first_on_node.values()], "resume", self.deadlines.save_s,
                "deadlines.save_s")
        assert len(set(counts)) == 1, f"learner ranks resumed at different update counts: {counts}"
        self.trained = counts[0]
        return counts[0]

    def _send(self, folder: Path, plan: dict[int, list[str]], wanted: list[list[str]], key: str,
              chunk_bytes: int) -> None:
        """The driver streams each rank's planned files from `folder` to the rank's node."""
        for rank, names in plan.items():
            t0 = time.time()
            actor = self.actors[rank]
            send_bounded(checkpoint.file_chunks(folder, names, chunk_bytes),
                         lambda name, offset, data, a=actor: a.receive_state_chunk.remote(key, name, offset, data),
                         lambda ref, r=rank: self._one(ref, r, "resume"), in_flight=2)
            size = sum((folder / name).stat().st_size for name in names)
            print(f"[rlsys] learner {rank}: {len(names)} of the {len(wanted[rank])} state files it reads sent to "
                  f"its node ({size / 2**20:.1f} MiB) in {time.time() - t0:.1f}s", flush=True)

    def _fetch(self, uri: str, rel: str, listed: dict[str, dict], plan: dict[int, list[str]], key: str) -> None:
        """Each rank downloads its planned files of checkpoint `rel` from the storage itself, all
        nodes at once (a node's ranks load only after every download is done)."""
        t0 = time.time()
        self._all([self.actors[r].fetch_part.remote(uri, rel, {n: listed[n] for n in names}, key)
                   for r, names in plan.items()], "resume", self.deadlines.save_s, "deadlines.save_s")
        size = sum(listed[n]["size"] for names in plan.values() for n in names)
        print(f"[rlsys] learner ranks {sorted(plan)} fetched the state files they read from {uri}/{rel} themselves "
              f"({size / 2**20:.1f} MiB, sha256 checked) in {time.time() - t0:.1f}s", flush=True)

    def _streamed(self, stream, rank: int) -> Iterator[tuple[str, bytes]]:
        """A rank's save_files stream, chunk by chunk; each chunk within deadlines.save_s of the
        previous one (a rank hung in its save raises PhaseTimeout, one that died ActorLost)."""
        while True:
            ready, _ = ray.wait([stream], timeout=self.deadlines.save_s)
            if not ready:
                raise PhaseTimeout("save", [self.names[rank]], self.deadlines.save_s, "deadlines.save_s")
            try:
                ref = next(stream)
            except StopIteration:
                return
            yield self._one(ref, rank, "save")

    def _one(self, ref, rank: int, phase: str):
        return get_all([ref], [self.names[rank]], phase, self.deadlines.save_s, "deadlines.save_s")[0]


def shipping(rank_nodes: list[str], driver_node: str, shared_storage: bool) -> list[bool]:
    """Per learner rank: does its part of a checkpoint travel through the driver? Yes for a rank
    on another node than the driver without cluster.shared_storage: it cannot see the run folder.

    >>> shipping(["a", "b"], "a", shared_storage=False), shipping(["a", "b"], "a", shared_storage=True)
    ([False, True], [False, False])
    """
    return [not shared_storage and node != driver_node for node in rank_nodes]


def deliveries(ships: list[bool], nodes: list[str], wanted: list[list[str]]) -> dict[int, list[str]]:
    """The files the driver sends to each rank that ships (by rank, in rank order): every file a
    rank reads (wanted[rank]) reaches its node once. Ranks on one node share the folder they
    receive into, so a file several of them read (the module states: the whole model and, under
    ZeRO-0, its optimizer) goes to the first of them only.

    >>> deliveries([False, True, True, True], ["h", "a", "a", "b"], [[], ["m", "z1"], ["m", "z2"], ["m", "z3"]])
    {1: ['m', 'z1'], 2: ['z2'], 3: ['m', 'z3']}
    """
    sent: dict[str, set[str]] = {}
    out = {}
    for rank, (ship, node) in enumerate(zip(ships, nodes)):
        if ship:
            have = sent.setdefault(node, set())
            out[rank] = [name for name in wanted[rank] if name not in have]
            have.update(out[rank])
    return out


def send_bounded(items: Iterable[tuple], submit: Callable, wait: Callable, in_flight: int = 2) -> int:
    """submit(*item) for each item in order, with at most `in_flight` submitted and not yet
    waited for (wait(ref) on the oldest before the next submit): the backpressure that keeps a
    stream of chunks from piling up in the sender's memory or the object store. Items are taken
    from the iterable only when they can be sent. Returns how many were sent.

    >>> sent = []
    >>> send_bounded(iter([(1,), (2,), (3,)]), lambda x: sent.append(x) or x, lambda ref: None)
    3
    """
    pending: deque = deque()
    count = 0
    for item in items:
        if len(pending) >= in_flight:
            wait(pending.popleft())
        pending.append(submit(*item))
        count += 1
    while pending:
        wait(pending.popleft())
    return count


def start_learner_group(cfg: Config, model_path: str, updates: int | None = None,
                        placement_name: str = "rlsys-learners") -> tuple[LearnerGroup, object]:
    """A learner group alone, set up and ready to train (`rlsys sft`, benchmarks); returns it and
    its placement group. updates: optimizer steps in the run (the LR schedule's length; None: a
    GRPO run's, from trainer.total_steps). placement_name: Ray refuses two placement groups of one
    name, so a second group alive beside the first (a benchmark's reference) needs its own."""
    backend = resolve_backend(cfg.cluster.backend, ray.cluster_resources())
    lay = layout(learners_alone(cfg), backend == "nccl")
    pg = place(placement_name, *lay.groups["rlsys-learners"], cfg.cluster)
    actors = learner_actors(cfg, ModelSource.of(cfg.model, model_path), backend, lay, {"rlsys-learners": pg}, updates)
    ip = ray.get(actors[0].whereami.remote())["ip"]
    port = ray.get(actors[0].free_port.remote())
    ray.get([a.setup.remote(ip, port) for a in actors])
    group = LearnerGroup(actors, cfg)
    group.ships()  # decided now, as `launch` does, and said once
    return group, pg


def learners_alone(cfg: Config) -> Config:
    """The config a learner group started alone is placed by. cluster.placement any and
    disaggregated (the ranks only on nodes declaring cluster.learner_resource) mean the same as in
    a GRPO run; colocated puts generator i beside learner rank i, and without generators that means
    nothing: the ranks are placed as with `any`, said once."""
    if cfg.cluster.placement != "colocated":
        return cfg
    print("[rlsys] cluster.placement=colocated puts generator i beside learner rank i; this command starts "
          "learners only, so they are placed as with cluster.placement=any", flush=True)
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, placement="any"))


def learner_actors(cfg: Config, model: ModelSource, backend: str, lay, pgs: dict, updates: int | None = None) -> list:
    per_batch = None  # a given count (SFT) has no rollout batches
    if updates is None:
        per_batch = cfg.learner.epochs * (cfg.rollout_batch_size // cfg.learner.mini_batch_size)
        updates = cfg.trainer.total_steps * per_batch
    return [LearnerActor.options(num_cpus=s.num_cpus, num_gpus=s.num_gpus, **in_group(pgs[s.group], s.bundle),
                                 runtime_env={"env_vars": threads(s.num_cpus)}).remote(
        model, model_dtype(cfg, backend == "nccl"), cfg.learner, cfg.algo, cfg.generator.temperature,
        s.rank, cfg.learner.num_ranks, backend, cfg.trainer.seed, updates, per_batch)
        for s in lay.of("learner")]
