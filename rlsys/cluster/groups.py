"""The Ray edge: placement groups, actors, and the handles the loop calls.

Nothing else in rlsys imports Ray's actor machinery: Generator, Learner and RewardWorker are
plain classes; here each becomes an actor (a subclass that can also say where it runs), each
group gets a placement group that must be placed within `cluster.placement_timeout_s` or the
run stops with the resources it was waiting for, and the group handles below submit work to
every member and `ray.get` once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlsys import checkpoint
from rlsys.config import Config
from rlsys.actors.generator import Generator, engine_env
from rlsys.actors.learner import Learner
from rlsys.observe.profile import Span, Traced
from rlsys.actors.reward_worker import RewardWorker
from rlsys.types import RewardResult, Rollout, TrainBatch
from rlsys.actors.weight_sync import Bucket


class Placed:
    """Mixed into every actor: where am I, and which GPUs Ray gave me."""

    def whereami(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]}


@ray.remote
class GeneratorActor(Traced, Generator, Placed):
    PHASES = ("generate", "receive_weights")


@ray.remote
class LearnerActor(Traced, Learner, Placed):
    PHASES = ("train", "broadcast_weights")


@ray.remote
class RewardActor(Traced, RewardWorker, Placed):
    PHASES = ("score",)


def resolve_backend(backend: str, cluster_resources: dict) -> str:
    """auto: NCCL when the CLUSTER has GPUs, else gloo. Never the driver's own CUDA: a submitted
    job's driver runs on the head node, which on most GPU clusters has none.

    >>> resolve_backend("auto", {"CPU": 16.0, "GPU": 8.0}), resolve_backend("auto", {"CPU": 16.0})
    ('nccl', 'gloo')
    """
    if backend != "auto":
        return backend
    return "nccl" if cluster_resources.get("GPU", 0) > 0 else "gloo"


def _bundles(num: int, cpus: float, gpus: int) -> list[dict]:
    bundle = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    return [dict(bundle) for _ in range(num)]


def _place(name: str, bundles: list[dict], strategy: str, timeout_s: float):
    pg = placement_group(bundles, strategy=strategy, name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(
            f"placement group {name!r} ({len(bundles)} x {bundles[0]}, {strategy}) was not placed within "
            f"{timeout_s:.0f}s; cluster has {ray.cluster_resources()}, free {ray.available_resources()}")
    return pg


def _in(pg, index: int) -> dict:
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}


class GeneratorPool:
    def __init__(self, actors: list):
        self.actors = actors

    def generate(self, prompts: list[tuple[int, int, str, str]], n: int, **sampling) -> list[Rollout]:
        """Spread prompts over engines by pending work: each engine holds one chunk at a time and
        takes the next as soon as it returns, so a slow engine gets fewer chunks. Two chunks per
        engine on average: small enough to balance, large enough for vLLM to batch."""
        size = max(1, math.ceil(len(prompts) / (2 * len(self.actors))))
        chunks = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        results: dict[int, list[Rollout]] = {}
        pending = {}
        next_chunk = 0
        idle = list(self.actors)
        while next_chunk < len(chunks) or pending:
            while idle and next_chunk < len(chunks):
                actor = idle.pop()
                pending[actor.generate.remote(chunks[next_chunk], n, **sampling)] = (next_chunk, actor)
                next_chunk += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            index, actor = pending.pop(done[0])
            results[index] = ray.get(done[0])
            idle.append(actor)
        return [r for i in range(len(chunks)) for r in results[i]]


def check_verifier(results: list[RewardResult]) -> list[RewardResult]:
    """One sample's verifier error is the model's odd text (scored 0, counted, the run goes on);
    every sample of a call failing is a broken verifier, and training on its zeros would hide it."""
    if len(results) > 1 and all(r.error is not None for r in results):
        raise RuntimeError(f"the verifier failed on all {len(results)} samples of this call (first: "
                           f"{results[0].error}): it is broken, not the model's text")
    return results


class RewardPool:
    def __init__(self, actors: list, prefill: str = ""):
        self.actors = actors
        self.prefill = prefill  # written by the prompt, scored as the model's own text

    def score(self, rollouts: list[Rollout]) -> list[RewardResult]:
        samples = [(self.prefill + r.text, r.answer) for r in rollouts]
        size = math.ceil(len(samples) / len(self.actors))
        refs = [a.score.remote(samples[i * size:(i + 1) * size]) for i, a in enumerate(self.actors)]
        return check_verifier([res for chunk in ray.get(refs) for res in chunk])


class LearnerGroup:
    def __init__(self, actors: list, ship_checkpoints: bool = False):
        """ship_checkpoints: rank 0 streams checkpoint files to the driver, which writes them
        (rank 0 on another node than the driver, no shared storage)."""
        self.actors = actors
        self.ship_checkpoints = ship_checkpoints

    def train(self, batch: TrainBatch) -> dict[str, float]:
        ref = ray.put(batch)  # one copy in the object store, read by every rank
        return ray.get([a.train.remote(ref) for a in self.actors])[0]

    def full_state_dict(self) -> dict:
        return ray.get([a.full_state_dict.remote() for a in self.actors])[0]

    def save(self, path: Path) -> None:
        """An HF checkpoint at `path` (absolute, in the run folder) whatever node rank 0 runs on."""
        if not self.ship_checkpoints:
            ray.get([a.save.remote(str(path)) for a in self.actors])
            # cluster.shared_storage=true on a path that is not shared: rank 0 wrote the checkpoint
            # to its own node's disk, and the run would end "successfully" without it. A few
            # seconds' grace for shared filesystems that cache a missing name briefly.
            deadline = time.time() + 10
            while not (path / "config.json").is_file():
                if time.time() > deadline:
                    raise RuntimeError(
                        f"learner rank 0 wrote checkpoint {path}, but the driver does not see it: with "
                        f"cluster.shared_storage=true the run folder must be on storage that every node "
                        f"mounts at the same path (the checkpoint is on rank 0's node's local disk). Use "
                        f"cluster.shared_storage=false to have checkpoints sent to the driver")
                time.sleep(0.5)
            return
        # Backpressure: rank 0 is at most two chunks ahead of the driver's writes.
        streams = [a.save_files.options(_generator_backpressure_num_objects=2).remote() for a in self.actors]
        checkpoint.receive((ray.get(ref) for ref in streams[0]), path)
        for stream in streams[1:]:  # the other ranks only gathered; their errors surface here
            for ref in stream:
                ray.get(ref)


class WeightSync:
    """Learner rank 0 -> every generator worker, over a group of its own."""

    def __init__(self, learners: LearnerGroup, generators: GeneratorPool, backend: str, workers_per_engine: int):
        self.learners, self.generators = learners, generators
        rank0 = learners.actors[0]
        self.plan: list[Bucket] = ray.get(rank0.sync_plan.remote())
        addr = ray.get(rank0.whereami.remote())["ip"]
        port = ray.get(rank0.free_port.remote())  # a fresh port beside the learners' own
        world = 1 + len(generators.actors) * workers_per_engine
        ray.get([rank0.join_sync.remote(addr, port, world)] + [
            g.join_sync.remote(addr, port, 1 + i * workers_per_engine, world, backend)
            for i, g in enumerate(generators.actors)])

    def push(self, version: int) -> list[int]:
        """Broadcast the learner's weights; returns the version each generator now reports."""
        sends = [a.broadcast_weights.remote(self.plan) for a in self.learners.actors]
        receives = [g.receive_weights.remote(self.plan, version) for g in self.generators.actors]
        ray.get(sends)
        return ray.get(receives)

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
    placement: list[dict]
    placement_groups: list

    def tracks(self) -> dict[str, list[Span]]:
        """The spans every actor recorded since the last call, by track name ("generator 0", ...)."""
        named = [(f"generator {i}", a) for i, a in enumerate(self.generators.actors)]
        named += [(f"reward {i}", a) for i, a in enumerate(self.rewards.actors)]
        named += [(f"learner {i}", a) for i, a in enumerate(self.learner.actors if self.learner else [])]
        spans = ray.get([a.take_spans.remote() for _, a in named])
        return {name: s for (name, _), s in zip(named, spans)}

    def shutdown(self) -> None:
        learners = self.learner.actors if self.learner else []
        for actor in self.generators.actors + self.rewards.actors + learners:
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


def _threads(cpus: float) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(max(1, int(cpus)))}


def _start_generators(cfg: Config, model_path: str, gpu: bool):
    gpus = cfg.generator.tensor_parallel_size if gpu else 0
    pg = _place("rlsys-generators", _bundles(cfg.generator.num_engines, cfg.generator.num_cpus, gpus), "PACK",
                cfg.cluster.placement_timeout_s)
    env = engine_env(cfg.generator) | _threads(cfg.generator.num_cpus)
    actors = [GeneratorActor.options(num_cpus=cfg.generator.num_cpus, num_gpus=gpus, **_in(pg, i),
                                     runtime_env={"env_vars": env}
                                     ).remote(model_path, cfg.generator, cfg.model.dtype, cfg.trainer.seed + i)
              for i in range(cfg.generator.num_engines)]
    return actors, pg, [("generator", i, cfg.generator.num_cpus, gpus) for i in range(len(actors))]


def _start_rewards(cfg: Config, verifier: str):
    reward_cfg = dataclasses.replace(cfg.reward, verifier=verifier)
    actors = [RewardActor.options(num_cpus=cfg.reward.num_cpus).remote(reward_cfg)
              for _ in range(cfg.reward.num_workers)]
    return actors, [("reward", i, cfg.reward.num_cpus, 0) for i in range(len(actors))]


def _start_learners(cfg: Config, model_path: str, backend: str):
    gpu = int(backend == "nccl")
    pg = _place("rlsys-learners", _bundles(cfg.learner.num_ranks, cfg.learner.num_cpus, gpu), "PACK",
                cfg.cluster.placement_timeout_s)
    updates = cfg.trainer.total_steps * cfg.learner.epochs * (cfg.rollout_batch_size // cfg.learner.mini_batch_size)
    actors = [LearnerActor.options(num_cpus=cfg.learner.num_cpus, num_gpus=gpu, **_in(pg, r),
                                   runtime_env={"env_vars": _threads(cfg.learner.num_cpus)}).remote(
        model_path, cfg.model.dtype, cfg.learner, cfg.algo, cfg.generator.temperature,
        r, cfg.learner.num_ranks, backend, cfg.trainer.seed, updates)
        for r in range(cfg.learner.num_ranks)]
    return actors, pg, [("learner", r, cfg.learner.num_cpus, gpu) for r in range(len(actors))]


def start_learner_group(cfg: Config, model_path: str) -> tuple[LearnerGroup, object]:
    """A learner group alone, set up and ready to train (benchmarks); returns it and its placement group."""
    actors, pg, _ = _start_learners(cfg, model_path, resolve_backend(cfg.cluster.backend, ray.cluster_resources()))
    ip = ray.get(actors[0].whereami.remote())["ip"]
    port = ray.get(actors[0].free_port.remote())
    ray.get([a.setup.remote(ip, port) for a in actors])
    return LearnerGroup(actors), pg


def _placement(actors: list, roles: list[tuple]) -> list[dict]:
    """Every actor: role, rank, node, pid, ip, the GPU ids Ray assigned it, and what it asked for."""
    where = ray.get([a.whereami.remote() for a in actors])
    return [{"role": role, "rank": rank, **w, "resources": {"CPU": cpus, "GPU": gpus}}
            for (role, rank, cpus, gpus), w in zip(roles, where)]


def launch(cfg: Config, model_path: str, verifier: str, train: bool = True) -> Groups:
    """Placement groups + actors, nothing else. train=False starts generators and reward workers
    only (evaluation)."""
    backend = resolve_backend(cfg.cluster.backend, ray.cluster_resources())
    t0 = time.time()
    learners, learner_pgs, learner_roles = [], [], []
    if train:
        learners, learner_pg, learner_roles = _start_learners(cfg, model_path, backend)
        learner_pgs = [learner_pg]
    generators, gen_pg, gen_roles = _start_generators(cfg, model_path, backend == "nccl")
    rewards, reward_roles = _start_rewards(cfg, verifier)
    placement = _placement(learners + generators + rewards, learner_roles + gen_roles + reward_roles)
    if cfg.profile.enabled:
        ray.get([a.start_tracing.remote() for a in learners + generators + rewards])
    pool, learner_group, sync = GeneratorPool(generators), None, None
    if train:
        port = ray.get(learners[0].free_port.remote())
        ray.get([a.setup.remote(placement[0]["ip"], port) for a in learners])
        driver_node = ray.get_runtime_context().get_node_id()
        ship = not cfg.cluster.shared_storage and placement[0]["node_id"] != driver_node
        if ship:
            print(f"[rlsys] learner rank 0 runs on node {placement[0]['node_id'][:12]}, the driver on "
                  f"{driver_node[:12]}, no cluster.shared_storage: checkpoints are sent to the driver, "
                  f"which writes them into the run folder", flush=True)
        learner_group = LearnerGroup(learners, ship)
        sync = WeightSync(learner_group, pool, backend, cfg.generator.tensor_parallel_size)
    print(f"[rlsys] {len(learners)} learners, {len(generators)} generators, {len(rewards)} reward workers "
          f"ready in {time.time() - t0:.1f}s (backend {backend})", flush=True)
    return Groups(pool, RewardPool(rewards, cfg.data.prefill), learner_group, sync, placement, learner_pgs + [gen_pg])
