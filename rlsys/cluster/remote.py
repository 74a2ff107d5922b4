"""Ray's side of things, in one place: the actor classes, placement groups that must be placed
in bounded time, and what the cluster says about itself (autoscaler, draining nodes).

Generator, Learner and RewardWorker are plain classes (rlsys/actors/); here each becomes an actor
that can also say where it runs.
"""

from __future__ import annotations

import os
import time

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlsys.actors.generator import Generator
from rlsys.actors.learner import Learner
from rlsys.actors.reward_worker import RewardWorker
from rlsys.actors.sandbox_worker import SandboxWorker
from rlsys.cluster.deadlines import install_stack_dump
from rlsys.config import ClusterConfig
from rlsys.data.models import ModelSource
from rlsys.observe.profile import Traced

REPORT_EVERY_S = 10.0


class Placed:
    """Mixed first into every actor: where am I, which GPUs Ray gave me; and, from its start, its
    Python stacks on demand (rlsys.cluster.deadlines.dump_stacks)."""

    def __init__(self, *args, **kwargs):
        install_stack_dump()
        gloo_on_node_address()
        # The model as this node has it (nodes share no disk): see rlsys.data.models.ModelSource.
        args = [a.local() if isinstance(a, ModelSource) else a for a in args]
        super().__init__(*args, **kwargs)

    def whereami(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]}


def gloo_on_node_address() -> None:
    """Gloo binds to whatever the hostname resolves to, and falls back to loopback when it resolves
    to nothing (a node whose hostname is in no DNS or /etc/hosts: common in containers): a peer on
    another node then waits on a collective forever. Bind it to the interface that holds the
    address Ray knows this node by, unless the user chose one."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    import psutil

    ip = ray.util.get_node_ip_address()
    names = [name for name, addrs in psutil.net_if_addrs().items() if any(a.address == ip for a in addrs)]
    if not names:  # an address translated on the way (NAT, a container's published port): gloo's own choice stays
        print(f"[rlsys] no network interface of this node holds its Ray address {ip}: gloo binds to what the "
              f"hostname resolves to; set GLOO_SOCKET_IFNAME if collectives across nodes hang", flush=True)
        return
    os.environ["GLOO_SOCKET_IFNAME"] = names[0]


@ray.remote
class GeneratorActor(Placed, Traced, Generator):
    PHASES = ("generate", "receive_weights")


@ray.remote
class LearnerActor(Placed, Traced, Learner):
    PHASES = ("train", "broadcast_weights", "share_weights")


@ray.remote
class RewardActor(Placed, Traced, RewardWorker):
    PHASES = ("score",)


@ray.remote
class SandboxActor(Placed, Traced, SandboxWorker):
    PHASES = ("run",)


def autoscaler_running() -> bool:
    """Whether the cluster runs an autoscaler (`ray up`, KubeRay with autoscaling, the fake
    multi-node provider). Every head node runs a monitor that writes its status into the GCS
    key-value store; a head started without an autoscaling config runs it over a read-only
    provider whose node types are named "node_<node id>" (one per node it finds). A real
    autoscaler's node types are the config's (ray.head.default, rollout, ...). Autoscaler v2
    (KubeRay's option) keeps the cluster's node types in the GCS instead."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get("__autoscaling_status")
    report = json.loads(status).get("autoscaler_report") if status is not None else None
    if report:
        types = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {})
        return any(not t.startswith("node_") for t in types)
    return ray._private.state.state.get_cluster_config() is not None


def draining_nodes() -> set[str]:
    """Node ids that Ray marks as draining (a spot-preemption notice, `ray drain-node`, an
    autoscaler scale-down). Ray has no public call for it; Ray Serve and Ray Data use this one."""
    return set(ray._private.state.state.get_draining_nodes())


def node_roles() -> dict[str, list[str]]:
    """node id -> the custom resources it declares (rollout, learner, ...), for placement.json."""
    plain = {"CPU", "GPU", "memory", "object_store_memory"}
    return {n["NodeID"]: sorted(k for k in n["Resources"] if k not in plain and not k.startswith("node:"))
            for n in ray.nodes() if n["Alive"]}


def placement_record(where: dict, asked: dict, roles: dict[str, list[str]]) -> dict:
    """An actor's placement.json entry: whereami() plus its node's custom resources (from
    node_roles()) and the CPUs/GPUs it asked for."""
    return where | {"node_resources": roles.get(where["node_id"], []), "resources": asked}


def missing(bundles: list[dict]) -> str:
    """What the cluster lacks for these bundles, in words: resources no node declares, then the
    totals that exceed what is free now."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    free = ray.available_resources()
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0) + v
    absent = sorted(k for k in need if not any(k in n for n in nodes))
    short = [f"{k}: needs {v:g}, free {free.get(k, 0):g}" for k, v in sorted(need.items())
             if k not in absent and free.get(k, 0) < v]
    parts = ([f"no alive node declares {', '.join(absent)}"] if absent else []) + short
    return "; ".join(parts) or "each resource is free in total, but no node (or no set of nodes) fits the bundles"


def place(name: str, bundles: list[dict], strategy: str, cluster: ClusterConfig) -> PlacementGroup:
    """A placement group, placed, or an error naming what is missing. With an autoscaler the wait
    is cluster.autoscaler_timeout_s (nodes take minutes to boot) and reported every few seconds;
    without one, cluster.placement_timeout_s."""
    pg = placement_group(bundles, strategy=strategy, name=name)
    autoscaling = autoscaler_running()
    timeout = cluster.autoscaler_timeout_s if autoscaling else cluster.placement_timeout_s
    start = time.time()
    wait = 1.0  # a group that fits is placed at once; report a wait early, then every REPORT_EVERY_S
    while True:
        left = start + timeout - time.time()
        ready, _ = ray.wait([pg.ready()], timeout=max(0.0, min(wait, left)))
        wait = REPORT_EVERY_S
        if ready:
            return pg
        waited = time.time() - start
        if waited >= timeout:
            remove_placement_group(pg)
            raise RuntimeError(
                f"placement group {name!r} ({len(bundles)} x {bundles[0]}, {strategy}) was not placed within "
                f"{timeout:.0f}s{' (the autoscaler did not bring the nodes)' if autoscaling else ''}: "
                f"{missing(bundles)}. Cluster has {ray.cluster_resources()}, free {ray.available_resources()}")
        if autoscaling:
            print(f"[rlsys] waiting for the autoscaler ({waited:.0f}s of {timeout:.0f}s): {name} needs "
                  f"{len(bundles)} x {bundles[0]} ({strategy}); missing now: {missing(bundles)}", flush=True)


def in_group(pg: PlacementGroup, index: int) -> dict:
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}


def threads(cpus: float) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(max(1, int(cpus)))}
