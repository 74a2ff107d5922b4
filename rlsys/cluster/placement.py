"""Where each role runs: the placement bundles every actor asks for, from the config alone.

Pure functions (no Ray calls), so the cluster files in cluster/ (launcher YAML, KubeRay, Slurm)
can be checked against exactly what a run will ask for.

cluster.placement:
  any            each actor needs its CPUs (and GPUs) and nothing else; Ray picks the node.
  disaggregated  generator bundles also ask for a sliver of the custom resource `rollout`,
                 learner bundles for a sliver of `learner` (names from cluster.rollout_resource /
                 learner_resource). A node that declares the resource (any amount: it works as a
                 label) joins that pool; CPUs and GPUs do the counting.
  colocated      one bundle per learner rank holding that rank and generator i = rank: a node, and
                 on GPUs a GPU (half each), shared. vLLM on a shared GPU needs a small
                 generator.gpu_memory_utilization.

Every generator has a placement group of its own (one bundle), so the elastic pool can add and
remove one engine at a time and give its node back. Learners share one placement group:
PACK, or STRICT_SPREAD with `cluster.learners_per_node` ranks per bundle (one bundle a node).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlsys.config import Config, ConfigError

MARKER = 0.001
"""How much of a role resource one bundle asks for: enough to need a node that declares it, small
enough never to be what runs out."""


@dataclass(frozen=True)
class ActorSlot:
    """One actor: which bundle of which placement group, and what it takes from that bundle."""
    role: str
    rank: int
    group: str  # placement group name
    bundle: int
    num_cpus: float
    num_gpus: float


@dataclass(frozen=True)
class Layout:
    groups: dict[str, tuple[list[dict], str]]  # placement group name -> (bundles, strategy)
    slots: list[ActorSlot]

    def of(self, role: str) -> list[ActorSlot]:
        return [s for s in self.slots if s.role == role]


def _bundle(cpus: float, gpus: float, marker: str | None = None) -> dict:
    return {"CPU": cpus} | ({"GPU": gpus} if gpus else {}) | ({marker: MARKER} if marker else {})


def generator_bundle(cfg: Config, gpu: bool) -> dict:
    """The one bundle of one generator's placement group (also what the autoscaler is asked for)."""
    marker = cfg.cluster.rollout_resource if cfg.cluster.placement == "disaggregated" else None
    return _bundle(cfg.generator.num_cpus, cfg.generator.tensor_parallel_size if gpu else 0, marker)


def generator_group(index: int) -> str:
    return f"rlsys-generator-{index}"


def layout(cfg: Config, gpu: bool, train: bool = True) -> Layout:
    """Placement groups and actor slots for the learners (train=True) and the starting generators.
    Reward workers have no placement group: they are small CPU actors Ray places anywhere."""
    g, l, c = cfg.generator, cfg.learner, cfg.cluster
    if train:  # evaluation pushes no weights
        refuse_on_device(cfg, gpu)
    groups: dict[str, tuple[list[dict], str]] = {}
    slots: list[ActorSlot] = []
    if c.placement == "colocated":
        # generator i + learner rank i in bundle i; evaluation (train=False) keeps the same shape.
        share = 0.5 if gpu else 0
        groups["rlsys-colocated"] = ([_bundle(l.num_cpus + g.num_cpus, 1 if gpu else 0)
                                      for _ in range(l.num_ranks)], "PACK")
        for i in range(l.num_ranks):
            if train:
                slots.append(ActorSlot("learner", i, "rlsys-colocated", i, l.num_cpus, share))
            slots.append(ActorSlot("generator", i, "rlsys-colocated", i, g.num_cpus, share))
        return Layout(groups, slots)
    if train:
        marker = c.learner_resource if c.placement == "disaggregated" else None
        per = c.learners_per_node or 1
        bundles = [_bundle(per * l.num_cpus, per * int(gpu), marker) for _ in range(l.num_ranks // per)]
        groups["rlsys-learners"] = (bundles, "STRICT_SPREAD" if c.learners_per_node else "PACK")
        slots += [ActorSlot("learner", r, "rlsys-learners", r // per, l.num_cpus, int(gpu))
                  for r in range(l.num_ranks)]
    for i in range(g.num_engines):
        groups[generator_group(i)] = ([generator_bundle(cfg, gpu)], "PACK")
        slots.append(ActorSlot("generator", i, generator_group(i), 0, g.num_cpus,
                               g.tensor_parallel_size if gpu else 0))
    return Layout(groups, slots)


def refuse_on_device(cfg: Config, gpu: bool) -> None:
    """Settings that config.validate cannot judge because they fail only on GPUs (known once the
    cluster is: resolve_backend), refused before any placement group or actor exists.

    Colocated on GPUs, learner rank i and engine i hold one GPU between them. Over a collective
    they would be two ranks of one NCCL group on one device, which NCCL refuses ("Duplicate GPU
    detected") at the first push; by handle (CUDA IPC) the push needs no group between them.

    >>> from rlsys.config import load_config
    >>> refuse_on_device(load_config(None, ["cluster.placement=colocated", "learner.sync_by_handle=false"]), gpu=False)
    """
    if cfg.cluster.placement == "colocated" and gpu and not cfg.learner.sync_by_handle:
        raise ConfigError(
            "cluster.placement=colocated on GPUs with learner.sync_by_handle=false: learner rank i and generator i "
            "share one GPU, and NCCL refuses two ranks of one group on one device (\"Duplicate GPU detected\") at the "
            "first weight push. Set learner.sync_by_handle=true (the push then goes by CUDA IPC handle) or use "
            "cluster.placement=any or disaggregated")


def node_can_host(node_resources: dict, bundle: dict) -> bool:
    """A node with these total resources could hold this bundle (on an empty node).

    >>> node_can_host({"CPU": 8, "GPU": 4, "rollout": 1}, {"CPU": 1, "GPU": 2, "rollout": MARKER})
    True
    >>> node_can_host({"CPU": 8, "GPU": 4}, {"CPU": 1, "GPU": 2, "rollout": MARKER})
    False
    """
    return all(node_resources.get(k, 0) >= v for k, v in bundle.items())


def resolve_backend(backend: str, cluster_resources: dict) -> str:
    """auto: NCCL when the CLUSTER has GPUs, else gloo. Never the driver's own CUDA: a submitted
    job's driver runs on the head node, which on most GPU clusters has none.

    >>> resolve_backend("auto", {"CPU": 16.0, "GPU": 8.0}), resolve_backend("auto", {"CPU": 16.0})
    ('nccl', 'gloo')
    """
    if backend != "auto":
        return backend
    return "nccl" if cluster_resources.get("GPU", 0) > 0 else "gloo"
