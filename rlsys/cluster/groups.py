"""The Ray edge: the groups of actors the loop calls, and how they are started.

`launch` places every role where cluster.placement says (rlsys/cluster/placement.py), starts
the actors (rlsys/cluster/remote.py) and returns the handles below, which submit work to every
member and `ray.get` once. The generators form an elastic pool (rlsys/cluster/pool.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import remove_placement_group

from rlsys import checkpoint
from rlsys.actors.generator import engine_env
from rlsys.actors.weight_sync import Bucket, combined
from rlsys.cluster.placement import generator_bundle, generator_group, layout
from rlsys.cluster.deadlines import LOST, get_all
from rlsys.cluster.pool import Engine, GeneratorPool, start_engine
from rlsys.cluster.remote import (GeneratorActor, LearnerActor, Placed, RewardActor, in_group, node_roles, place,
                                  placement_record, threads)
from rlsys.config import Config, engine_memory_share
from rlsys.data.models import ModelSource
from rlsys.math.packing import cut
from rlsys.observe.profile import Span
from rlsys.types import RewardResult, Rollout, TrainBatch

__all__ = ["Placed", "RewardActor", "resolve_backend"]  # re-exported for tests and benchmarks


def resolve_backend(backend: str, cluster_resources: dict) -> str:
    """auto: NCCL when the CLUSTER has GPUs, else gloo. Never the driver's own CUDA: a submitted
    job's driver runs on the head node, which on most GPU clusters has none.

    >>> resolve_backend("auto", {"CPU": 16.0, "GPU": 8.0}), resolve_backend("auto", {"CPU": 16.0})
    ('nccl', 'gloo')
    """
    if backend != "auto":
        return backend
    return "nccl" if cluster_resources.get("GPU", 0) > 0 else "gloo"


def check_verifier(results: list[RewardResult]) -> list[RewardResult]:
    """One sample's verifier error is the model's odd text (scored 0, counted, the run goes on);
    every sample of a call failing is a broken verifier, and training on its zeros would hide it."""
    if len(results) > 1 and all(r.error is not None for r in results):
        raise RuntimeError(f"the verifier failed on all {len(results)} samples of this call (first: "
                           f"{results[0].error}): it is broken, not the model's text")
    return results


class RewardPool:
    def __init__(self, actors: list, prefill: str = "", make=None, max_restarts: int = 3, timeout_s: float = 600.0,
                 start_timeout_s: float = 300.0):
        """make(): a new reward actor, to replace one that died or hung (None: that stops the run).
        timeout_s: how long one worker's share may take (deadlines.score_s), counted once it runs;
        start_timeout_s: how long a replacement may take to start (deadlines.start_s)."""
        self.actors = actors
        self.prefill = prefill  # written by the prompt, scored as the model's own text
        self.make, self.max_restarts, self.restarts = make, max_restarts, 0
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s

    def score(self, rollouts: list[Rollout]) -> list[RewardResult]:
        """Every sample scored once. A worker that dies (its process killed, its node lost) or
        gives no answer within timeout_s (hung) is killed, with its verifier child, and replaced;
        its share is scored again by the new one; at most max_restarts times a run."""
        samples = [(self.prefill + r.text, r.answer) for r in rollouts]
        size = math.ceil(len(samples) / len(self.actors))
        shares = [samples[i * size:(i + 1) * size] for i in range(len(self.actors))]
        results: list[list[RewardResult] | None] = [None] * len(shares)
        while any(r is None for r in results):
            pending = {self.actors[i].score.remote(shares[i]): i for i, r in enumerate(results) if r is None}
            deadline = time.monotonic() + self.timeout_s
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not ready:  # hung: every worker still busy is replaced, its share scored again
                    for i in pending.values():
                        self._replace(i, f"gave no result within {self.timeout_s:g}s (deadlines.score_s)",
                                      len(shares[i]))
                    break
                i = pending.pop(ready[0])
                try:
                    results[i] = ray.get(ready[0])
                except LOST as e:
                    self._replace(i, f"died ({type(e).__name__})", len(shares[i]))
        return check_verifier([res for chunk in results for res in chunk])

    def _replace(self, i: int, why: str, samples: int) -> None:
        self.restarts += 1
        if self.make is None or self.restarts > self.max_restarts:
            raise RuntimeError(f"reward worker {i} {why}; {self.restarts} reward worker failures in this run, "
                               f"cluster.max_actor_restarts={self.max_restarts}")
        print(f"[rlsys] reward worker {i} {why}; replaced, its {samples} samples scored again", flush=True)
        ray.kill(self.actors[i])  # its verifier child dies with it (PR_SET_PDEATHSIG)
        self.actors[i] = self.make()
        get_all([self.actors[i].whereami.remote()], [f"reward worker {i}"], "reward worker start",
                self.start_timeout_s, "deadlines.start_s")  # started before its deadline runs


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


def check_received(sent: list[int], received: dict[int, list[list[int]]]) -> None:
    """Every worker of every engine got exactly the buckets the learners sent (checksums per bucket), or
    the run stops: a generator serving other weights than the learner's is a silent error.

    >>> check_received([7, 9], {0: [[7, 9]], 1: [[7, 9], [7, 9]]})
    >>> check_received([7, 9], {0: [[7, 9]], 1: [[7, 9], [7, 8]]})
    Traceback (most recent call last):
    ...
    RuntimeError: weight sync: generator 1 worker 1 received bucket 1 with checksum 8, the learners sent 9 (buckets differ: [1])
    """
    for engine, workers in received.items():
        for worker, got in enumerate(workers):
            if got != sent:
                differ = [i for i in range(max(len(got), len(sent)))
                          if i >= len(got) or i >= len(sent) or got[i] != sent[i]]
                first = differ[0]
                raise RuntimeError(
                    f"weight sync: generator {engine} worker {worker} received bucket {first} with checksum "
                    f"{got[first] if first < len(got) else None}, the learners sent "
                    f"{sent[first] if first < len(sent) else None} (buckets differ: {differ})")


class WeightSync:
    """The learner ranks -> every generator worker: each sending rank its share of the buckets,
    over a group of its own (learner.sync_from_all_ranks; else rank 0 sends them all).

    The group is built for one membership of the pool; `push` rebuilds it first whenever the pool
    changed (an engine joined, left or was lost): collective groups cannot grow or shrink in place."""

    def __init__(self, learners: LearnerGroup, generators: GeneratorPool, backend: str, workers_per_engine: int,
                 timeout_s: float = 600.0):
        """timeout_s: one push or group rebuild, both sides (deadlines.sync_s)."""
        self.learners, self.generators, self.timeout_s = learners, generators, timeout_s
        self.backend, self.workers = backend, workers_per_engine
        rank0 = learners.actors[0]
        self.plan: list[Bucket] = ray.get(rank0.sync_plan.remote())
        self.senders = learners.actors[:ray.get(rank0.senders.remote())]  # each sends its share of the buckets
        self.shards: int = ray.get(rank0.sync_shards.remote())  # > 1: ZeRO-3 ranks each send their partitions
        self.addrs = [where["ip"] for where in ray.get([a.whereami.remote() for a in self.senders])]
        self.members: list[int] | None = None
        self.connect()

    def _group(self, engines: list[Engine]) -> None:
        """One group per sending learner rank: that rank and every worker of these engines."""
        ports = ray.get([a.free_port.remote() for a in self.senders])  # fresh ports beside the learners' own
        world = 1 + len(engines) * self.workers
        rendezvous = list(zip(self.addrs, ports))
        senders = [a.join_sync.remote(addr, port, world, self.timeout_s)
                   for a, (addr, port) in zip(self.senders, rendezvous)]
        receivers = [e.actor.join_sync.remote(rendezvous, 1 + i * self.workers, world, self.backend, self.timeout_s)
                     for i, e in enumerate(engines)]
        get_all(senders + receivers, self.learners.names[:len(self.senders)] + [f"generator {e.index}" for e in engines],
                "sync (group)", self.timeout_s, "deadlines.sync_s")

    def _sent(self, per_rank: list[dict[int, int]]) -> list[int]:
        """Every bucket's checksum, in plan order, from the ranks that sent it (its pieces' checksums
        combined when each rank sent a piece of every bucket)."""
        merged: dict[int, list[int]] = {}
        for sums in per_rank:
            for i, c in sums.items():
                merged.setdefault(i, []).append(c)
        assert sorted(merged) == list(range(len(self.plan))), f"buckets sent: {sorted(merged)} of {len(self.plan)}"
        assert all(len(pieces) == self.shards for pieces in merged.values()), f"pieces per bucket, {self.shards} expected"
        return [combined(merged[i]) for i in range(len(self.plan))]

    def connect(self) -> None:
        """(Re)build the group over the pool's engines as they are now."""
        self._group(self.generators.engines)
        self.members = [e.index for e in self.generators.engines]

    def catch_up(self, engines: list[Engine], version: int) -> None:
        """Engines joining the pool get the current weights (as `version`) over a group of rank 0
        and them alone, before they serve a prompt; the engines already serving are not disturbed.
        The next push rebuilds the full group."""
        self._group(engines)
        self.members = None
        versions = self._send(engines, version)
        assert versions == [version] * len(engines), f"joining engines report versions {versions}, expected {version}"

    def _send(self, engines: list[Engine], version: int | None) -> list:
        """Every learner rank sends its buckets; the engines load them as `version`, or, with None,
        only receive them (the wire alone). Returns what each engine's receive returned."""
        sends = [a.broadcast_weights.remote(self.plan) for a in self.learners.actors]
        receives = [e.actor.receive_wire.remote(self.plan, self.shards) if version is None
                    else e.actor.receive_weights.remote(self.plan, version, self.shards) for e in engines]
        # Both sides done (every worker has loaded what it received) before the loop goes on.
        done = get_all(sends + receives, self.learners.names + [f"generator {e.index}" for e in engines], "sync",
                       self.timeout_s, "deadlines.sync_s")
        sent, received = self._sent(done[:len(sends)]), done[len(sends):]
        check_received(sent, {e.index: sums for e, (_, sums) in zip(engines, received)})
        return [version for version, _ in received]

    def _current_engines(self) -> list[Engine]:
        """The pool's live engines, the group rebuilt over them if it changed. Engines that died
        since the step's generate leave first (a dead member breaks a broadcast: gloo's sender
        fails at once, the other receivers would wait out the group timeout)."""
        self.generators.drop_dead()
        if self.members != [e.index for e in self.generators.engines]:
            self.connect()
        return self.generators.engines

    def push(self, version: int) -> list[int]:
        """Broadcast the learner's weights; returns the version each generator now reports."""
        return self._send(self._current_engines(), version)

    def push_wire(self) -> None:
        """A push's wire part alone: the learners' buckets (copied from their parameters, as in
        `push`) into the engines' receive buffers, checksums compared, nothing loaded (the sync
        benchmark sets it against push_raw and against the whole push)."""
        self._send(self._current_engines(), None)

    def push_raw(self) -> None:
        """The same bytes as `push` in one flat buffer, over the same group: the link's best case."""
        dtype = self.plan[0][0].dtype
        assert all(m.dtype == dtype for b in self.plan for m in b), "raw broadcast assumes one dtype"
        numel = sum(m.numel for b in self.plan for m in b)
        sends = [self.learners.actors[0].broadcast_raw.remote(numel, dtype)]
        ray.get(sends + [g.receive_raw.remote(numel, dtype) for g in self.generators.actors])


@dataclass
class Groups:
    generators: GeneratorPool
    rewards: RewardPool
    learner: LearnerGroup | None
    sync: WeightSync | None
    others: list[dict]  # placement records of the learners and reward workers
    placement_groups: list

    @property
    def placement(self) -> list[dict]:
        """Every actor now: role, rank, node (id, ip, the node's custom resources), pid, GPU ids and
        what it asked for. Generators are listed as the pool is now (engines join and leave)."""
        return self.others + [e.where | {"role": "generator", "rank": e.index} for e in self.generators.engines]

    def tracks(self) -> dict[str, list[Span]]:
        """The spans every actor recorded since the last call, by track name ("generator 0", ...)."""
        named = [(f"generator {e.index}", e.actor) for e in self.generators.engines]
        named += [(f"reward {i}", a) for i, a in enumerate(self.rewards.actors)]
        named += [(f"learner {i}", a) for i, a in enumerate(self.learner.actors if self.learner else [])]
        spans = ray.get([a.take_spans.remote() for _, a in named])
        return {name: s for (name, _), s in zip(named, spans)}

    def shutdown(self) -> None:
        self.generators.shutdown()
        learners = self.learner.actors if self.learner else []
        for actor in self.rewards.actors + learners:
            ray.kill(actor)
        for pg in self.placement_groups:
            remove_placement_group(pg)


def in_ray_job() -> bool:
    """This process is the driver of a job submitted with `ray job submit`."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def init_ray(cfg: Config) -> None:
    """cluster.address set: connect to that cluster. Unset: the cluster running this job when it
    is a submitted Ray job, else a new local cluster in this process, even when a cluster started
    with `ray start` runs on this machine (address="local": never attach to it by accident)."""
    if ray.is_initialized():
        return
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address)
        return
    if in_ray_job():
        ray.init()
        return
    wanted = (cfg.generator.num_engines * cfg.generator.num_cpus + cfg.learner.num_ranks * cfg.learner.num_cpus
              + cfg.reward.num_workers * cfg.reward.num_cpus)
    num_cpus = cfg.cluster.num_cpus or max(os.cpu_count() or 1, math.ceil(wanted))
    # Logical CPUs: on a small machine the actors share cores; Ray only books them.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def _where(actors: list, asked: list[dict], role: str, timeout_s: float) -> list[dict]:
    """Each actor's placement record, once it has started (a generator: its vLLM engine loaded)."""
    roles = node_roles()
    started = get_all([a.whereami.remote() for a in actors], [f"{role} {i}" for i in range(len(actors))],
                      f"{role} start", timeout_s, "deadlines.start_s")
    return [placement_record(w, r, roles) for w, r in zip(started, asked)]


def start_learner_group(cfg: Config, model_path: str, updates: int | None = None) -> tuple[LearnerGroup, object]:
    """A learner group alone, set up and ready to train (`rlsys sft`, benchmarks); returns it and
    its placement group. updates: optimizer steps in the run (the LR schedule's length; None: a
    GRPO run's, from trainer.total_steps)."""
    backend = resolve_backend(cfg.cluster.backend, ray.cluster_resources())
    lay = layout(dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, placement="any")),
                 backend == "nccl")
    pg = place("rlsys-learners", *lay.groups["rlsys-learners"], cfg.cluster)
    actors = _learners(cfg, ModelSource.of(cfg.model, model_path), backend, lay, {"rlsys-learners": pg}, updates)
    ip = ray.get(actors[0].whereami.remote())["ip"]
    port = ray.get(actors[0].free_port.remote())
    ray.get([a.setup.remote(ip, port) for a in actors])
    return LearnerGroup(actors, cfg), pg


def _learners(cfg: Config, model: ModelSource, backend: str, lay, pgs: dict, updates: int | None = None) -> list:
    per_batch = None  # a given count (SFT) has no rollout batches
    if updates is None:
        per_batch = cfg.learner.epochs * (cfg.rollout_batch_size // cfg.learner.mini_batch_size)
        updates = cfg.trainer.total_steps * per_batch
    return [LearnerActor.options(num_cpus=s.num_cpus, num_gpus=s.num_gpus, **in_group(pgs[s.group], s.bundle),
                                 runtime_env={"env_vars": threads(s.num_cpus)}).remote(
        model, cfg.model.dtype, cfg.learner, cfg.algo, cfg.generator.temperature,
        s.rank, cfg.learner.num_ranks, backend, cfg.trainer.seed, updates, per_batch)
        for s in lay.of("learner")]


def launch(cfg: Config, model_path: str, verifier: str, train: bool = True) -> Groups:
    """Placement groups + actors, nothing else. train=False starts generators and reward workers
    only (evaluation)."""
    backend = resolve_backend(cfg.cluster.backend, ray.cluster_resources())
    gpu = backend == "nccl"
    t0 = time.time()
    lay = layout(cfg, gpu, train)
    pgs = {name: place(name, bundles, strategy, cfg.cluster) for name, (bundles, strategy) in lay.groups.items()}
    model = ModelSource.of(cfg.model, model_path)  # each actor finds or builds it on its own node
    learners = _learners(cfg, model, backend, lay, pgs) if train else []
    env = engine_env(cfg.generator) | threads(cfg.generator.num_cpus)
    gen_gpus = cfg.generator.tensor_parallel_size if gpu else 0
    asked = {"CPU": cfg.generator.num_cpus, "GPU": gen_gpus}
    engine_cfg = dataclasses.replace(cfg.generator, gpu_memory_utilization=engine_memory_share(cfg))

    def generator(index: int, where: dict, gpus: float = gen_gpus):
        return GeneratorActor.options(num_cpus=cfg.generator.num_cpus, num_gpus=gpus, runtime_env={"env_vars": env},
                                      **where).remote(model, engine_cfg, cfg.model.dtype,
                                                      cfg.trainer.seed + index)

    engines = []
    for s in lay.of("generator"):
        actor = generator(s.rank, in_group(pgs[s.group], s.bundle), s.num_gpus)
        own = pgs.pop(s.group) if s.group == generator_group(s.rank) else None  # the engine's own group
        engines.append(Engine(s.rank, actor, own, time.time(), asked={"CPU": s.num_cpus, "GPU": s.num_gpus}))
    reward_cfg = dataclasses.replace(cfg.reward, verifier=verifier)

    def reward_worker():
        return RewardActor.options(num_cpus=cfg.reward.num_cpus).remote(reward_cfg)

    rewards = [reward_worker() for _ in range(cfg.reward.num_workers)]
    start_s = cfg.deadlines.start_s
    for e, w in zip(engines, _where([e.actor for e in engines], [e.asked for e in engines], "generator", start_s)):
        e.where = w
    learner_asks = [{"CPU": s.num_cpus, "GPU": s.num_gpus} for s in lay.of("learner")]
    others = [w | {"role": "learner", "rank": s.rank}
              for s, w in zip(lay.of("learner"), _where(learners, learner_asks, "learner", start_s))]
    reward_asks = [{"CPU": cfg.reward.num_cpus, "GPU": 0}] * len(rewards)
    others += [w | {"role": "reward", "rank": i} for i, w in enumerate(_where(rewards, reward_asks, "reward", start_s))]
    if cfg.profile.enabled:
        ray.get([a.start_tracing.remote() for a in learners + [e.actor for e in engines] + rewards])
    bundle = generator_bundle(cfg, gpu)
    elastic = cfg.cluster.placement != "colocated"  # colocated engines live and die with their learner rank
    pool = GeneratorPool(engines, start=(lambda i: start_engine(i, lambda where: generator(i, where), bundle, asked))
                         if elastic else None, autoscale=cfg.autoscale, bundle=bundle,
                         wait_timeout_s=cfg.autoscale.node_timeout_s if cfg.autoscale.enabled
                         else cfg.cluster.placement_timeout_s, max_restarts=cfg.cluster.max_actor_restarts,
                         generate_timeout_s=cfg.deadlines.generate_s, chunks_per_engine=cfg.generator.chunks_per_engine)
    learner_group, sync = None, None
    if train:
        port = ray.get(learners[0].free_port.remote())
        get_all([a.setup.remote(others[0]["ip"], port) for a in learners], [f"learner {i}" for i in range(len(learners))],
                "learner setup", cfg.deadlines.start_s, "deadlines.start_s")
        driver_node = ray.get_runtime_context().get_node_id()
        ship = not cfg.cluster.shared_storage and others[0]["node_id"] != driver_node
        if ship:
            print(f"[rlsys] learner rank 0 runs on node {others[0]['node_id'][:12]}, the driver on "
                  f"{driver_node[:12]}, no cluster.shared_storage: checkpoints are sent to the driver, "
                  f"which writes them into the run folder", flush=True)
        learner_group = LearnerGroup(learners, cfg, ship)
        sync = WeightSync(learner_group, pool, backend, cfg.generator.tensor_parallel_size, cfg.deadlines.sync_s)
    print(f"[rlsys] {len(learners)} learners, {len(engines)} generators, {len(rewards)} reward workers "
          f"ready in {time.time() - t0:.1f}s (backend {backend}, placement {cfg.cluster.placement})", flush=True)
    return Groups(pool, RewardPool(rewards, cfg.data.prefill, make=reward_worker,
                                   max_restarts=cfg.cluster.max_actor_restarts, timeout_s=cfg.deadlines.score_s,
                                   start_timeout_s=cfg.deadlines.start_s),
                  learner_group, sync, others, list(pgs.values()))
