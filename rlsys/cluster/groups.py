"""The Ray edge: the groups of actors the loop calls, and how they are started.

`launch` places every role where cluster.placement says (rlsys/cluster/placement.py), starts
the actors (rlsys/cluster/remote.py) and returns the handles below, which submit work to every
member and `ray.get` once. The generators form an elastic pool (rlsys/cluster/pool.py), the
reward workers a pool (rlsys/cluster/rewards.py), the learners a group (rlsys/cluster/learners.py);
the weight push joins generators and learners (rlsys/cluster/sync.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import remove_placement_group

from rlsys.actors.generator import engine_env
from rlsys.actors.weight_sync import sending_ranks
from rlsys.cluster.deadlines import get_all
from rlsys.cluster.learners import LearnerGroup, learner_actors
from rlsys.cluster.placement import generator_bundle, generator_group, layout, resolve_backend
from rlsys.cluster.pool import Engine, GeneratorPool, start_engine
from rlsys.cluster.rewards import CodeRewardPool, RewardPool
from rlsys.cluster.sandboxes import SandboxPool
from rlsys.cluster.remote import (GeneratorActor, RewardActor, SandboxActor, in_group, node_roles, place,
                                  placement_record, threads)
from rlsys.cluster.sync import WeightSync
from rlsys.config import Config, engine_memory_share, offload_states, on_device, sleep_level
from rlsys.data.models import ModelSource
from rlsys.observe.profile import Span
from rlsys.sandbox.judge import limits_of

@dataclass
class Groups:
    generators: GeneratorPool
    rewards: RewardPool | CodeRewardPool
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
        role = "sandbox" if isinstance(self.rewards, CodeRewardPool) else "reward"  # the sandbox's spans: runs
        named += [(f"{role} {i}", a) for i, a in enumerate(self.rewards.actors)]
        named += [(f"learner {i}", a) for i, a in enumerate(self.learner.actors if self.learner else [])]
        spans = ray.get([a.take_spans.remote() for _, a in named])
        return {name: s for (name, _), s in zip(named, spans)}

    def shutdown(self) -> None:
        self.generators.shutdown()
        learners = self.learner.actors if self.learner else []
        self.rewards.close()
        for actor in learners:
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
              + (cfg.reward.code.max_workers * cfg.reward.code.num_cpus if cfg.reward.verifier == "code"
                 else cfg.reward.num_workers * cfg.reward.num_cpus))
    num_cpus = cfg.cluster.num_cpus or max(os.cpu_count() or 1, math.ceil(wanted))
    # Logical CPUs: on a small machine the actors share cores; Ray only books them.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def _where(actors: list, asked: list[dict], role: str, timeout_s: float) -> list[dict]:
    """Each actor's placement record, once it has started (a generator: its vLLM engine loaded)."""
    roles = node_roles()
    started = get_all([a.whereami.remote() for a in actors], [f"{role} {i}" for i in range(len(actors))],
                      f"{role} start", timeout_s, "deadlines.start_s")
    return [placement_record(w, r, roles) for w, r in zip(started, asked)]


def launch(cfg: Config, model_path: str, verifier: str, train: bool = True) -> Groups:
    """Placement groups + actors, nothing else. train=False starts generators and reward workers
    only (evaluation)."""
    backend = resolve_backend(cfg.cluster.backend, ray.cluster_resources())
    gpu = backend == "nccl"
    if cfg.model.dtype == "auto" and gpu and cfg.learner.zero_stage == 0:
        print("[rlsys] model.dtype=auto: float32 on these GPUs, since learner.zero_stage=0 (DeepSpeed accumulates "
              "ZeRO-0 bf16 gradients in bf16); learner.zero_stage >= 1 trains in bfloat16", flush=True)
    cfg = on_device(cfg, gpu)  # model.dtype=auto resolved by the actors' device
    t0 = time.time()
    lay = layout(cfg, gpu, train)
    pgs = {name: place(name, bundles, strategy, cfg.cluster) for name, (bundles, strategy) in lay.groups.items()}
    model = ModelSource.of(cfg.model, model_path)  # each actor finds or builds it on its own node
    learners = learner_actors(cfg, model, backend, lay, pgs) if train else []
    env = engine_env(cfg.generator) | threads(cfg.generator.num_cpus)
    gen_gpus = cfg.generator.tensor_parallel_size if gpu else 0
    asked = {"CPU": cfg.generator.num_cpus, "GPU": gen_gpus}
    communicators = sending_ranks(cfg.learner, cfg.learner.num_ranks) if train else 0  # each engine worker's sync groups
    engine_cfg = dataclasses.replace(cfg.generator, gpu_memory_utilization=engine_memory_share(cfg),
                                     sleep_level=sleep_level(cfg, gpu) if train else 0)

    def generator(index: int, where: dict, gpus: float = gen_gpus):
        return GeneratorActor.options(num_cpus=cfg.generator.num_cpus, num_gpus=gpus, runtime_env={"env_vars": env},
                                      **where).remote(model, engine_cfg, cfg.model.dtype,
                                                      cfg.trainer.seed + index, communicators, cfg.reward.code)

    engines = []
    for s in lay.of("generator"):
        actor = generator(s.rank, in_group(pgs[s.group], s.bundle), s.num_gpus)
        own = pgs.pop(s.group) if s.group == generator_group(s.rank) else None  # the engine's own group
        engines.append(Engine(s.rank, actor, own, time.time(), asked={"CPU": s.num_cpus, "GPU": s.num_gpus}))
    reward_cfg = dataclasses.replace(cfg.reward, verifier=verifier)
    code = cfg.reward.code
    reward_cpus = code.num_cpus if verifier == "code" else cfg.reward.num_cpus

    def reward_worker():
        return RewardActor.options(num_cpus=reward_cpus).remote(reward_cfg)

    def sandbox_worker(max_concurrency: int):  # the programs' judges, in place of the reward workers
        return SandboxActor.options(num_cpus=reward_cpus, max_concurrency=max_concurrency).remote(code)

    sandboxes = None
    if verifier == "code":
        sandboxes = SandboxPool(sandbox_worker, code.workers, code.max_workers, code.backlog, limits_of(code),
                                cfg.reward.timeout_s, cfg.deadlines.start_s, cfg.cluster.max_actor_restarts,
                                code.runs_per_worker)
        rewards = [a for a, _ in sandboxes.starting.values()]
    else:
        rewards = [reward_worker() for _ in range(cfg.reward.num_workers)]
    start_s = cfg.deadlines.start_s
    for e, w in zip(engines, _where([e.actor for e in engines], [e.asked for e in engines], "generator", start_s)):
        e.where = w
    learner_asks = [{"CPU": s.num_cpus, "GPU": s.num_gpus} for s in lay.of("learner")]
    others = [w | {"role": "learner", "rank": s.rank}
              for s, w in zip(lay.of("learner"), _where(learners, learner_asks, "learner", start_s))]
    reward_asks = [{"CPU": reward_cpus, "GPU": 0}] * len(rewards)
    role = "sandbox" if verifier == "code" else "reward"
    others += [w | {"role": role, "rank": i} for i, w in enumerate(_where(rewards, reward_asks, role, start_s))]
    if sandboxes is not None:
        sandboxes.wait_ready()  # started (above): now they serve
    if cfg.profile.enabled:
        ray.get([a.start_tracing.remote() for a in learners + [e.actor for e in engines] + rewards])
    bundle = generator_bundle(cfg, gpu)
    elastic = cfg.cluster.placement != "colocated"  # colocated engines live and die with their learner rank
    pool = GeneratorPool(engines, start=(lambda i: start_engine(i, lambda where: generator(i, where), bundle, asked))
                         if elastic else None, autoscale=cfg.autoscale, bundle=bundle,
                         wait_timeout_s=cfg.autoscale.node_timeout_s if cfg.autoscale.enabled
                         else cfg.cluster.placement_timeout_s, max_restarts=cfg.cluster.max_actor_restarts,
                         generate_timeout_s=cfg.deadlines.generate_s, chunks_per_engine=cfg.generator.chunks_per_engine,
                         sleeps=engine_cfg.sleep_level > 0)
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
        learner_group = LearnerGroup(learners, cfg, ship, offloads=offload_states(cfg, gpu))
        sync = WeightSync(learner_group, pool, backend, cfg.generator.tensor_parallel_size, cfg.deadlines.sync_s,
                          by_handle=cfg.learner.sync_by_handle)
    print(f"[rlsys] {len(learners)} learners, {len(engines)} generators, {len(rewards)} {role} workers "
          f"ready in {time.time() - t0:.1f}s (backend {backend}, placement {cfg.cluster.placement}, "
          f"{cfg.model.dtype})", flush=True)
    scorer = (CodeRewardPool(sandboxes, cfg.data.prefill, reward_cfg) if sandboxes is not None else
              RewardPool(rewards, cfg.data.prefill, make=reward_worker, max_restarts=cfg.cluster.max_actor_restarts,
                         timeout_s=cfg.deadlines.score_s, start_timeout_s=cfg.deadlines.start_s, cfg=reward_cfg))
    return Groups(pool, scorer,
                  learner_group, sync, others, list(pgs.values()))
