"""The Ray edge: the groups of actors the loop calls, and how they are started.

`launch` places every role where cluster.placement says (rlsys/cluster/placement.py), starts
the actors (rlsys/cluster/remote.py) and returns the handles below, which submit work to every
member and `ray.get` once. The generators form an elastic pool (rlsys/cluster/pool.py), the
learners a group (rlsys/cluster/learners.py); the weight push joins them (rlsys/cluster/sync.py).
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
from rlsys.cluster.deadlines import LOST, get_all
from rlsys.cluster.learners import LearnerGroup, learner_actors, start_learner_group
from rlsys.cluster.placement import generator_bundle, generator_group, layout, resolve_backend
from rlsys.cluster.pool import Engine, GeneratorPool, start_engine
from rlsys.cluster.remote import (GeneratorActor, Placed, RewardActor, in_group, node_roles, place, placement_record,
                                  threads)
from rlsys.cluster.sync import WeightSync
from rlsys.config import Config, RewardConfig, engine_memory_share, offload_states, on_device, sleep_level
from rlsys.data.models import ModelSource
from rlsys.observe.profile import Span
from rlsys.types import RewardResult, Rollout

__all__ = ["Placed", "RewardActor", "resolve_backend", "start_learner_group"]  # re-exported for tests and benchmarks


def check_verifier(results: list[RewardResult]) -> list[RewardResult]:
    """One sample's verifier error is the model's odd text (scored 0, counted, the run goes on);
    every sample of a call failing is a broken verifier, and training on its zeros would hide it."""
    if len(results) > 1 and all(r.error is not None for r in results):
        raise RuntimeError(f"the verifier failed on all {len(results)} samples of this call (first: "
                           f"{results[0].error}): it is broken, not the model's text")
    return results


class RewardPool:
    def __init__(self, actors: list, prefill: str = "", make=None, max_restarts: int = 3, timeout_s: float = 600.0,
                 start_timeout_s: float = 300.0, cfg: RewardConfig | None = None):
        """make(): a new reward actor, to replace one that died or hung (None: that stops the run).
        cfg: the workers' config, verifier resolved (evaluation reads answers the way they judge them).
        timeout_s: how long one worker's share may take (deadlines.score_s), counted once it runs;
        start_timeout_s: how long a replacement may take to start (deadlines.start_s)."""
        self.actors = actors
        self.prefill = prefill  # written by the prompt, scored as the model's own text
        self.make, self.max_restarts, self.restarts = make, max_restarts, 0
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.cfg = cfg

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
                                                      cfg.trainer.seed + index, communicators)

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
    print(f"[rlsys] {len(learners)} learners, {len(engines)} generators, {len(rewards)} reward workers "
          f"ready in {time.time() - t0:.1f}s (backend {backend}, placement {cfg.cluster.placement}, "
          f"{cfg.model.dtype})", flush=True)
    return Groups(pool, RewardPool(rewards, cfg.data.prefill, make=reward_worker,
                                   max_restarts=cfg.cluster.max_actor_restarts, timeout_s=cfg.deadlines.score_s,
                                   start_timeout_s=cfg.deadlines.start_s, cfg=reward_cfg),
                  learner_group, sync, others, list(pgs.values()))
