"""Weight sync: learner rank 0 -> every generator engine, against a raw broadcast of the same bytes.

For each model size: a learner (1 rank, ZeRO-0) and 2 vLLM generators on the local Ray cluster,
joined in rlsys's sync group. Measured, interleaved, `repeats` times each:
- rlsys: WeightSync.push, the whole path a training step takes (bucket copies, broadcast, the
  engines loading every tensor in place through vLLM's reload path, prefix-cache reset);
- wire: the same push without the load (WeightSync.push_wire): the learner's buckets (views of
  its flat parameters; copies where parameters are not adjacent, as under ZeRO-3), broadcasts,
  the engines' receive buffers, checksums compared;
- raw: one preallocated flat buffer of the same bytes, broadcast over the same group between the
  same processes (no copy, no load): the best the link can do.
- by handle (learner.sync_by_handle, the engines being on the learner's node): the same push,
  whole and wire only, through the rank's shared buffer (rlsys.actors.shared_weights), and one
  memcpy of the same bytes in the driver (the floor of moving them once).
Ratio = raw seconds / wire seconds, per repeat (repeat i of each side back to back): the median,
with the lowest and highest (target >= 0.8, met only by the lowest); the whole push against raw
is reported beside it. By handle: the whole push against the collective's (target >= 2x) and the
wire against the memcpy (target >= 0.3). On GPU clusters (NCCL) a third figure sets
the time against the link roofline from benchmarks/hardware.yaml.

    python benchmarks/weight_sync.py [--quick]

With --link RATES (Mb/s, e.g. --link 10000,1000; root, rlsys/cluster/isolation.py): the learner on
one isolated node, the engine on another, both nodes' links shaped to each rate in turn (tc tbf,
rlsys/cluster/isolation.py; unshaped first, for reference), for a 95M and a 360M model. Measured
per size and rate: the wire part of a push (push_wire) and a raw broadcast of the same bytes
(push_raw), against the link's limit for those bytes (bytes x 8 / rate); ratio = limit / wire
(target >= 0.8). The driver runs on the head node and takes its orders over stdin (this script
with --serve), so the host can reshape the links between measurements without restarting the
actors.

    python benchmarks/weight_sync.py --link 10000,1000 [--quick]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (REPO, Figure, Section, hardware, link_label, link_limit_s, machine, main, parse_links,
                               ray_up, rlsys_config, tiny_model)

# (hidden, layers, heads): about 1M, 10M, 100M and 450M parameters of a random Qwen2.
SIZES = {"1M": (128, 6, 4), "10M": (384, 8, 6), "100M": (1024, 10, 16), "450M": (2048, 12, 32)}
TARGET = 0.8
# By handle, engines on the learner's node (issue 24's targets): the wire at >= 0.3 of one memcpy of
# the bytes, the whole push >= 2x faster than over the collective.
HANDLE_WIRE_TARGET = 0.3
HANDLE_TARGET = 2.0


class Memcpy:
    """`Memcpy()(nbytes)`: seconds of one copy of `nbytes` on every usable core, in this process:
    the floor of moving the bytes once. Its two buffers are made and touched on the first call and
    kept for the next ones (one measurement's), then go with the object."""

    def __init__(self):
        self.buffers: tuple | None = None

    def __call__(self, nbytes: int) -> float:
        import torch

        from rlsys.observe.hardware import usable_cpus

        if self.buffers is None or self.buffers[0].numel() != nbytes:
            self.buffers = (torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8))
            self.buffers[1].copy_(self.buffers[0])  # first touch
        src, dst = self.buffers
        threads = torch.get_num_threads()
        torch.set_num_threads(len(usable_cpus()))
        try:
            start = time.perf_counter()
            dst.copy_(src)
            return time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)


def use_transport(sync, by_handle: bool) -> None:
    """Switch a WeightSync between the collective and handles for every engine (all on the
    learner's node here), outside any timing: the collective's group is rebuilt for it."""
    sync.by_handle = by_handle
    sync.connect()


def measure(model_path: str, repeats: int, bucket_mb: float, learner: tuple[str, ...] = ("learner.num_ranks=1",),
            between=None, handle: bool = False) -> dict:
    """Pushes of `model_path`'s weights over the collective (learner.sync_by_handle=false): wire
    only, whole (with the engines' reload) and a raw broadcast of the same bytes, interleaved;
    with `handle`, the same push by handle (rlsys.actors.shared_weights: the engines here are on
    the learner's node), wire and whole, in each repeat too. `between(nbytes)`, if given, is called
    after each repeat's pushes and its seconds kept beside them (Memcpy)."""
    import ray

    from rlsys.cluster.groups import init_ray, launch
    from rlsys.cluster.placement import resolve_backend

    cfg = rlsys_config([f"model.path={model_path}", "learner.mini_batch_size=4",
                        "learner.micro_batch_size=2", "data.prompts_per_step=1", "algo.group_size=4",
                        "reward.num_workers=1", "generator.num_engines=2", "generator.max_tokens=8",
                        "generator.max_model_len=256", f"learner.sync_bucket_mb={bucket_mb}",
                        "learner.sync_by_handle=false", *learner])
    init_ray(cfg)
    groups = launch(cfg, model_path, "math")
    engines = groups.generators.actors

    def timed(call) -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    def whole(version: int, loads: list[float]) -> float:
        start = time.perf_counter()
        versions = sync.push(version)
        seconds = time.perf_counter() - start
        assert versions == [version] * len(engines)
        total, waited = ray.get(engines[0].receive_seconds.remote())
        loads.append(total - waited)
        return seconds

    try:
        sync = groups.sync
        nbytes = sum(m.numel * (4 if m.dtype == "float32" else 2) for b in sync.plan for m in b)
        version = 1
        sync.push(version), sync.push_raw(), sync.push_wire()  # warm-up: first touch of buffers and of the reload path
        if handle:
            use_transport(sync, True)
            version += 1
            sync.push(version), sync.push_wire()  # the shared buffers' first touch, the engines' first mapping
            use_transport(sync, False)
        reps: dict[str, list[float]] = {k: [] for k in ("rlsys", "raw", "wire", "load", "handle", "handle_wire",
                                                        "handle_load", "between")}
        for _ in range(repeats):
            reps["wire"].append(timed(sync.push_wire))
            version += 1
            reps["rlsys"].append(whole(version, reps["load"]))
            reps["raw"].append(timed(sync.push_raw))
            if handle:
                use_transport(sync, True)
                reps["handle_wire"].append(timed(sync.push_wire))
                version += 1
                reps["handle"].append(whole(version, reps["handle_load"]))
                use_transport(sync, False)
            if between is not None:
                reps["between"].append(between(nbytes))
        reps = {k: v for k, v in reps.items() if v}  # repeat i of each ran back to back
        return {"bytes": nbytes, "buckets": len(sync.plan), "rlsys_s": statistics.median(reps["rlsys"]),
                "raw_s": statistics.median(reps["raw"]), "wire_s": statistics.median(reps["wire"]),
                "repeats_s": reps, "engine_load_s": statistics.median(reps["load"]),
                "backend": resolve_backend(cfg.cluster.backend, ray.cluster_resources()),
                "generators": len(engines)}
    finally:
        groups.shutdown()


def run(quick: bool) -> Section:
    sizes = ["1M", "10M", "100M"] if quick else list(SIZES)
    repeats = 3 if quick else 5
    hw = hardware()
    section = Section("weight_sync", {"sizes": sizes, "repeats": repeats, "generators": 2, "bucket_mb": 32.0,
                                      "dtype": "float32"})
    ray_up()
    for size in sizes:
        path, params = tiny_model(*SIZES[size])
        m = measure(path, repeats, 32.0, between=Memcpy(), handle=True)
        gb = m["bytes"] / 1e9
        row = {"size": size, "params": params, **m, "rlsys_gb_per_s": gb / m["rlsys_s"], "raw_gb_per_s": gb / m["raw_s"]}
        section.rows.append(row)
        print(f"[weight_sync] {size} ({params / 1e6:.1f}M params, {gb:.3f} GB): rlsys {m['rlsys_s']:.3f}s, "
              f"raw {m['raw_s']:.3f}s", flush=True)
        reps = m["repeats_s"]
        section.figures.append(Figure.repeated(
            f"weight sync wire {size} ({params / 1e6:.0f}M params) seconds", reps["wire"], "s",
            f"raw {m['backend']} broadcast of one flat buffer, same {gb:.3f} GB, same group", reps["raw"],
            lower_is_better=True, target=TARGET,
            note="the wire part of a push: the learner's buckets (views of its flat parameters), broadcasts, the "
                 "engines' receive buffers and checksums; no load into the model"))
        section.figures.append(Figure.repeated(
            f"weight sync {size} ({params / 1e6:.0f}M params) seconds, with the engines' reload", reps["rlsys"], "s",
            f"raw {m['backend']} broadcast of one flat buffer, same {gb:.3f} GB, same group", reps["raw"],
            lower_is_better=True,
            note=f"{row['rlsys_gb_per_s']:.2f} GB/s vs {row['raw_gb_per_s']:.2f} GB/s; of rlsys's time, "
                 f"{m['engine_load_s']:.3f}s is vLLM's in-place load in the engine (not waiting on the wire); "
                 f"{m['buckets']} buckets, {m['generators']} generators"))
        section.figures.append(Figure.repeated(
            f"weight sync by handle {size} ({params / 1e6:.0f}M params) seconds, with the engines' reload",
            reps["handle"], "s", f"the same push over {m['backend']} (learner.sync_by_handle=false), same run",
            reps["rlsys"], lower_is_better=True, target=HANDLE_TARGET,
            note=f"engines on the learner's node: the rank's buckets in shared memory, mapped by the engines "
                 f"(rlsys.actors.shared_weights); of its time, {statistics.median(reps['handle_load']):.3f}s is "
                 f"vLLM's in-place load"))
        section.figures.append(Figure.repeated(
            f"weight sync by handle {size} ({params / 1e6:.0f}M params) wire seconds", reps["handle_wire"], "s",
            f"one memcpy of the same {gb:.3f} GB in the driver, same run", reps["between"],
            lower_is_better=True, target=HANDLE_WIRE_TARGET,
            note=f"ratio = share of the memcpy floor reached: the copy into the shared buffer, both sides' "
                 f"checksums, the driver's calls; over {m['backend']} the wire took "
                 f"{statistics.median(reps['wire']):.3f}s"))
        if m["backend"] == "nccl":  # a roofline means something for GPU links only
            link = hw["links"]["sync_path"]
            bandwidth = hw["links"][f"{link}_gb_per_s"]
            section.figures.append(Figure(
                f"weight sync {size} vs {link} roofline", m["rlsys_s"], "s",
                f"{gb:.3f} GB / {bandwidth} GB/s ({link}, benchmarks/hardware.yaml)", gb / bandwidth,
                lower_is_better=True))
    # A sharded learner: 2 ZeRO-3 ranks, each sending its partition of every bucket, against rank 0 alone.
    size = "10M" if quick else "100M"
    path, params = tiny_model(*SIZES[size])
    sharded = {all_ranks: measure(path, repeats, 32.0, ("learner.num_ranks=2", "learner.zero_stage=3",
                                                        f"learner.sync_from_all_ranks={all_ranks}"))
               for all_ranks in (False, True)}
    section.rows.append({"size": size, "params": params, "zero3_two_ranks": {str(k): v for k, v in sharded.items()}})
    section.figures.append(Figure(
        f"weight sync {size} from 2 ZeRO-3 ranks, each sending its buckets", sharded[True]["rlsys_s"], "s",
        "learner rank 0 sending every bucket (learner.sync_from_all_ranks=false), same group sizes",
        sharded[False]["rlsys_s"], lower_is_better=True,
        note=f"whole push incl. the engines' reload ({sharded[True]['engine_load_s']:.3f}s of it); wire alone: "
             f"{sharded[True]['wire_s']:.3f}s vs {sharded[False]['wire_s']:.3f}s; each rank sends its own ZeRO-3 "
             f"partition of every bucket (no gather), where rank 0 alone gathers every bucket first"))
    if section.rows and section.rows[0]["backend"] != "nccl":
        section.params["roofline"] = "not computed: gloo backend (CPU); the link roofline applies to NCCL clusters"
    return section


# ---------------------------------------------------------------- on shaped links (--link)

# (hidden, layers, heads) of rlsys's `tiny` random Qwen2 (vocab 108, intermediate 2 x hidden,
# kv heads = heads / 2, untied): 94.6M and 361.4M parameters, head_dim 64 both.
LINK_SIZES = {"95M": (1024, 10, 16), "360M": (1536, 17, 24)}
REPLY = "@@ "  # the prefix of the serving driver's answers on its stdout (Ray's own lines go to stderr)


def link_rows_figures(rows: list[dict]) -> list[Figure]:
    """Per size: unshaped wire against raw (as in run()); per shaped rate, wire against the link's
    limit for the same bytes (target) and raw against it (what gloo itself reaches on that link).
    A row's repeats (wire_all_s, raw_all_s: repeat i of each back to back) are the figures'
    samples; the limit, a number, stands beside each (a row without them: one measurement)."""
    figures = []
    for r in rows:
        gb = r["bytes"] / 1e9
        wire, raw = r.get("wire_all_s") or [r["wire_s"]], r.get("raw_all_s") or [r["raw_s"]]
        if r["rate_mbit"] is None:
            figures.append(Figure.repeated(
                f"sync wire {r['size']}, unshaped veth", wire, "s",
                f"raw gloo broadcast of one flat buffer, same {gb:.3f} GB", raw, lower_is_better=True,
                target=TARGET, note=f"{gb * 8 / r['wire_s']:.2f} Gb/s on the wire; learner and engine on "
                                    f"isolated nodes, one core each; no link limit"))
            continue
        label = link_label(r["rate_mbit"])
        limit = f"link limit: {gb:.3f} GB x 8 / {label}"
        figures.append(Figure.repeated(
            f"sync wire {r['size']} at {label}", wire, "s", limit, [r["limit_s"]] * len(wire), lower_is_better=True,
            target=TARGET, note=f"{gb * 8 / r['wire_s']:.2f} Gb/s achieved; raw broadcast {r['raw_s']:.3f}s "
                                f"({r['limit_s'] / r['raw_s']:.2f}x of the limit): where raw is below the limit "
                                f"too, the CPUs (gloo, copies, checksums), not the link, set the pace"))
        figures.append(Figure.repeated(
            f"raw broadcast {r['size']} at {label}", raw, "s", limit, [r["limit_s"]] * len(raw), lower_is_better=True,
            note="one preallocated flat buffer over the same group: what gloo reaches on this link, no rlsys code"))
    return figures


class Driver:
    """This script with --serve on the head node: a Ray driver that launches the groups and measures
    on request (one JSON line in, one REPLY line out), so the host can reshape the links between
    requests while the actors stay up."""

    def __init__(self, nodes, log: Path):
        env = clean_node_env()
        argv, pin = nodes.command("head", ["env", "-C", str(REPO), sys.executable, "-m", "benchmarks.weight_sync",
                                           "--serve", nodes.address])
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, preexec_fn=pin, start_new_session=True)

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                answer = json.loads(line[len(REPLY):])
                if "error" in answer:
                    raise RuntimeError(f"the sync driver on the head failed at {request}: {answer['error']}\n"
                                       f"(its log: {self.log.name})")
                return answer
        raise RuntimeError(f"the sync driver on the head exited ({self.proc.wait()}) at {request}; its log, "
                           f"{self.log.name}:\n{Path(self.log.name).read_text()[-4000:]}")

    def close(self) -> None:
        from rlsys.cluster.local import kill_tree

        if self.proc.poll() is None:
            try:
                self.ask({"do": "exit"})
                self.proc.wait(timeout=60)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                kill_tree(self.proc.pid)
        self.log.close()


def clean_node_env() -> dict[str, str]:
    """The environment of a command on an isolated node: no cache folder of the host's (read-only
    there); what the driver builds goes to the head's own home, as on a machine of its own."""
    from rlsys.cluster.local import clean_env

    env = clean_env()
    env["RLSYS_CACHE"] = f"{env.get('HOME', '/root')}/.cache/rlsys"  # benchmarks.common would point it at the repo
    return env


def serve(address: str) -> None:
    """The head's side of Driver: requests on stdin, answers on stdout, everything else on stderr."""
    import ray

    reply_to = sys.stdout
    sys.stdout = sys.stderr  # Ray, vLLM and rlsys print; only answers go to the host
    ray.init(address=address, log_to_driver=False)
    from rlsys.cluster.capacity import model_params
    from rlsys.cluster.groups import launch
    from rlsys.config import ModelConfig
    from rlsys.data.models import resolve_model

    groups = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["do"] == "launch":
                hidden, layers, heads = request["shape"]
                path = resolve_model(ModelConfig(path="tiny", tiny_hidden=hidden, tiny_layers=layers, tiny_heads=heads))
                cfg = rlsys_config([f"cluster.address={address}", "cluster.placement=disaggregated", "model.path=tiny",
                                    f"model.tiny_hidden={hidden}", f"model.tiny_layers={layers}",
                                    f"model.tiny_heads={heads}", "learner.num_ranks=1", "learner.mini_batch_size=4",
                                    "learner.micro_batch_size=2", "data.prompts_per_step=1", "algo.group_size=4",
                                    "reward.num_workers=1", "generator.num_engines=1", "generator.max_tokens=8",
                                    "generator.max_model_len=256", "learner.sync_bucket_mb=32"])
                groups = launch(cfg, path, "math")
                plan = groups.sync.plan
                answer = {"params": model_params(path), "buckets": len(plan),
                          "bytes": sum(m.numel * (4 if m.dtype == "float32" else 2) for b in plan for m in b)}
            elif request["do"] == "measure":
                sync = groups.sync
                sync.push_wire(), sync.push_raw()  # first touch of the buffers on both sides
                wire, raw = [], []
                for _ in range(request["repeats"]):  # interleaved: drift on the shared machine hits both
                    start = time.perf_counter()
                    sync.push_wire()
                    wire.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    sync.push_raw()
                    raw.append(time.perf_counter() - start)
                answer = {"wire": wire, "raw": raw}
            elif request["do"] == "stop":
                groups.shutdown()
                groups, answer = None, {}
            elif request["do"] == "exit":
                print(REPLY + "{}", file=reply_to, flush=True)
                return
            else:
                raise ValueError(f"unknown request {request}")
        except Exception as e:  # noqa: BLE001 -- the host gets the error and stops the benchmark with it
            import traceback

            traceback.print_exc()
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(REPLY + json.dumps(answer), file=reply_to, flush=True)


def model_params_of(hidden: int, layers: int, heads: int, vocab: int = 108) -> int:
    """Parameters of the tiny Qwen2 of this shape (rlsys/data/models.py build_tiny_model: kv heads
    heads / 2, intermediate 2 x hidden, untied, q/k/v biases); checked against the built model in
    tests/test_bench.py."""
    kv = hidden // 2
    layer = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden + 3 * hidden * 2 * hidden + 2 * hidden
    return layers * layer + 2 * vocab * hidden + hidden


def wait_for_memory(needed: float, what: str, timeout_s: float = 900.0) -> None:
    """On a shared machine, start `what` only once the memory it needs is free (Ray's monitor kills
    a worker when the node passes 95% of its memory, whoever used the rest); stop after timeout_s."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while (free := psutil.virtual_memory().available) < needed:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} need about {needed / 1e9:.1f} GB of memory; only {free / 1e9:.1f} GB "
                               f"was free for {timeout_s:.0f} s: run it when the machine is quieter")
        print(f"[weight_sync_link] waiting for {needed / 1e9:.1f} GB of free memory for {what} "
              f"({free / 1e9:.1f} GB now)", flush=True)
        time.sleep(30)


def run_link(quick: bool, link: list[float], sizes: list[str] | None = None) -> Section:
    """The learner node and the rollout node (one core each), the head (the driver, no CPUs) beside
    them; per model size (of LINK_SIZES; default all, --quick 95M), one launch, then unshaped and
    every rate of `link`, slowest last."""
    from rlsys.cluster.local import LocalNodes

    unknown = [s for s in sizes or [] if s not in LINK_SIZES]
    if unknown:
        raise ValueError(f"--sizes: unknown {unknown}; the link benchmark's sizes are {list(LINK_SIZES)}")
    sizes = sizes or (["95M"] if quick else list(LINK_SIZES))
    repeats = 2 if quick else 3
    rates: list[float | None] = [None, *sorted(link, reverse=True)]
    folder = REPO / "benchmarks" / "results" / f"weight_sync_link-{time.strftime('%Y%m%d-%H%M%S')}"
    info = machine()
    section = Section("weight_sync_link", {
        "sizes": {s: LINK_SIZES[s] for s in sizes}, "shape": "(hidden, layers, heads) of model.path=tiny",
        "rates_mbit": link, "repeats": repeats, "generators": 1, "learner_ranks": 1, "bucket_mb": 32.0,
        "dtype": "float32", "backend": "gloo", "shaping": "tc tbf on both ends of both nodes' links (burst 1 ms)",
        "nodes": "head (driver, 0 CPUs); learner node pinned to core 0; rollout node pinned to core 1",
        "cpu": info["cpu"], "cores": info["cpus"], "logs": str(folder.relative_to(REPO)),
        "limit": "bytes x 8 / rate: payload only, so even a perfect sender stays a few % under 1.0 "
                 "(TCP/IP headers on a 1500-byte MTU: about 3%)"})
    nodes = LocalNodes(folder / "nodes", isolated=True)
    # Each node's model cache on a disk of its own (a host folder per node, under /tmp: not kept),
    # not in its home's tmpfs: three copies of the 360M model would hold 4.3 GB of RAM.
    caches = Path(tempfile.mkdtemp(prefix="rlsys-wsl-cache-"))
    cache = {name: {caches / name: Path.home() / ".cache" / "rlsys"} for name in ("head", "learner", "rollout")}
    for folders in cache.values():
        for host in folders:
            host.mkdir()
    driver = None
    try:
        nodes.head(shared=cache["head"])
        nodes.worker("learner", 2, {"learner": 1}, cores=[0], shared=cache["learner"])  # the rank, the reward worker
        nodes.worker("rollout", 2, {"rollout": 1}, cores=[1 % (info["cpus"] or 1)], shared=cache["rollout"])
        driver = Driver(nodes, folder / "driver.log")
        for size in sizes:
            # learner: weights + raw buffer; engine: weights + raw buffer + KV cache; 2 GB for the rest
            wait_for_memory(3 * 4 * model_params_of(*LINK_SIZES[size]) + 3e9, f"the {size} model's actors")
            print(f"[weight_sync_link] {size}: starting the learner and the engine ...", flush=True)
            launched = driver.ask({"do": "launch", "shape": LINK_SIZES[size]})
            for rate in rates:
                for node in ("learner", "rollout"):
                    nodes.shape(node, rate_mbit=rate)
                m = driver.ask({"do": "measure", "repeats": repeats})
                row = {"size": size, "shape": LINK_SIZES[size], **launched, "rate_mbit": rate,
                       "wire_s": statistics.median(m["wire"]), "raw_s": statistics.median(m["raw"]),
                       "wire_all_s": m["wire"], "raw_all_s": m["raw"]}
                if rate is not None:
                    row["limit_s"] = link_limit_s(row["bytes"], rate)
                    row["ratio"] = row["limit_s"] / row["wire_s"]
                    if row["raw_s"] < 0.95 * row["limit_s"]:
                        raise RuntimeError(f"{size} at {link_label(rate)}: the raw broadcast took {row['raw_s']:.3f}s, "
                                           f"faster than the link allows ({row['limit_s']:.3f}s): the shaping is "
                                           f"not on the sync's path (rlsys/cluster/isolation.py shape)")
                section.rows.append(row)
                with open(folder / "rows.jsonl", "a") as out:  # kept if a later size fails
                    out.write(json.dumps(row) + "\n")
                print(f"[weight_sync_link] {size} ({launched['bytes'] / 1e9:.3f} GB) {link_label(rate)}: wire "
                      f"{row['wire_s']:.3f}s, raw {row['raw_s']:.3f}s"
                      + (f", limit {row['limit_s']:.3f}s, limit/wire {row['ratio']:.2f}" if rate else ""), flush=True)
            for node in ("learner", "rollout"):
                nodes.shape(node)
            driver.ask({"do": "stop"})
    finally:
        if driver is not None:
            driver.close()
        nodes.stop()
        shutil.rmtree(caches)
    section.figures = link_rows_figures(section.rows)
    return section


def main_cli(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--serve"]:
        serve(args[1])
        return
    main(run, args, options={"--link": dict(type=parse_links, default=None, metavar="MBITS",
                                             help="link rates in Mb/s, comma-separated (e.g. 10000,1000): "
                                                  "learner and engine on isolated nodes, links shaped (root)"),
                             "--sizes": dict(type=lambda text: text.split(","), default=None,
                                             help=f"with --link: model sizes of {','.join(LINK_SIZES)}")},
         run_with=run_cli)


def run_cli(quick: bool, link: list[float] | None, sizes: list[str] | None) -> Section:
    if link is None:
        if sizes is not None:
            raise SystemExit("--sizes goes with --link (the sizes of the link benchmark)")
        return run(quick)
    return run_link(quick, link, sizes)


if __name__ == "__main__":
    main_cli()
