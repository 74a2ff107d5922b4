"""CPU tuning probes: how the engines' threads, allocator and OpenMP runtime, and bf16 matmuls
behave on this machine. Each probe runs in fresh processes started with exactly the environment
under test (LD_PRELOAD only takes effect when set before a process starts), K of them at once
when measuring contention; the workers wait on each other after their warm-up, so the measured
calls overlap.

    python benchmarks/cpu_tuning.py gen  [--model smollm2|tiny] [--procs K] [--env K=V ...] [--cpus 0|1 ...]
    python benchmarks/cpu_tuning.py hf   [--model ...] [--env K=V ...]
    python benchmarks/cpu_tuning.py matmul [--env K=V ...] [--shapes MxKxN,...] [--dtypes float32,bfloat16]
    python benchmarks/cpu_tuning.py train [--dtype bfloat16] [--rows 8 --length 200 --scored 150]

--env applies to every process; --cpus gives each process its own affinity (one list per process,
"0,1" or "0"), set with os.sched_setaffinity before torch is imported. Prints one JSON line per
process: tokens/s (or GFLOP/s), the process's affinity, OMP_NUM_THREADS, torch threads, the OpenMP
runtime and allocator it loaded, and where its threads ran.

On a machine shared with other work, a measurement is only as good as the cores it had: the parent
samples /proc/stat while the workers run, reports the other processes' load during each timed
call (foreign_cores) and the best call that had none (best_clean_s), waits for a quiet machine
before starting, and tries again (--tries) when no call was clean.

What it found on a 2-vCPU Intel Xeon with AMX (SmolLM2-135M, fp32, 4 prompts x 8 x 32 tokens):
one in-process engine 143 tokens/s with 2 OpenMP threads, 86 with 1; two engines at once with 1
thread each 81 + 82 (pinned to cores 0 and 1: 82 + 83; both on core 0: 34 + 34), with 2 threads
each 28 + 27 (oversubscribed: OpenMP's spinning threads starve each other; OMP_WAIT_POLICY=PASSIVE
72 + 72, but one engine alone drops to 97). VLLM_CPU_OMP_THREADS_BIND does nothing to an
in-process engine (its threads keep the process's affinity). LD_PRELOAD of tcmalloc (138),
jemalloc (122), libiomp5 (113) or tcmalloc + libiomp5 (141) gave nothing over glibc + libgomp (143).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent


def _loaded() -> dict:
    maps = Path("/proc/self/maps").read_text()
    libs = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in maps.splitlines()
                   if any(k in line for k in ("omp", "malloc"))})
    threads = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            status = (task / "status").read_text()
            allowed = next(l.split(":")[1].strip() for l in status.splitlines() if l.startswith("Cpus_allowed_list"))
            threads[allowed] = threads.get(allowed, 0) + 1
        except (OSError, StopIteration):
            pass
    return {"libs": libs, "thread_affinities": threads}


def _barrier(d: str | None, index: int, count: int) -> None:
    if not d:
        return
    Path(d, f"ready-{index}").touch()
    while len(list(Path(d).glob("ready-*"))) < count:
        time.sleep(0.05)


def _gen_worker(a: dict) -> dict:
    from rlsys.actors.generator import Generator
    from rlsys.config import GeneratorConfig

    cfg = GeneratorConfig(max_tokens=a["tokens"], max_model_len=2048, kv_cache_gib=1, gpu_memory_utilization=0.5)
    gen = Generator(a["model"], cfg, a["dtype"], seed=0)
    batch = [(i, i, ids, "") for i, ids in enumerate(a["prompt_ids"])]
    gen.generate(batch[:2], n=2, min_tokens=a["tokens"])
    _barrier(a.get("barrier"), a["index"], a["count"])
    times, start, windows = [], time.time(), []
    for _ in range(a["repeats"]):
        t, w = time.perf_counter(), time.time()
        out = gen.generate(batch, n=a["n"], min_tokens=a["tokens"])
        times.append(time.perf_counter() - t)
        windows.append([w, time.time()])
    tokens = sum(len(r.response_ids) for r in out)
    import torch
    return {"tokens_per_s": tokens / min(times), "seconds": times, "torch_threads": torch.get_num_threads(),
            "window": [start, time.time()], "windows": windows}


def _hf_worker(a: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, a["dtype"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=dtype).eval()
    width = max(map(len, a["prompt_ids"]))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in a["prompt_ids"]])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in a["prompt_ids"]])

    def go(ids, mask):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                  top_k=0, num_return_sequences=a["n"], max_new_tokens=a["tokens"],
                                  min_new_tokens=a["tokens"], pad_token_id=0)

    go(ids[:2], mask[:2])
    _barrier(a.get("barrier"), a["index"], a["count"])
    times, start, windows = [], time.time(), []
    for _ in range(a["repeats"]):
        t, w = time.perf_counter(), time.time()
        go(ids, mask)
        times.append(time.perf_counter() - t)
        windows.append([w, time.time()])
    tokens = len(a["prompt_ids"]) * a["n"] * a["tokens"]
    return {"tokens_per_s": tokens / min(times), "seconds": times, "torch_threads": torch.get_num_threads(),
            "window": [start, time.time()], "windows": windows}


def _matmul_worker(a: dict) -> dict:
    import torch

    rows, start = {}, time.time()
    for m, k, n in a["shapes"]:
        for dtype in a["dtypes"]:
            x = torch.randn(m, k, dtype=getattr(torch, dtype))
            w = torch.randn(k, n, dtype=getattr(torch, dtype))
            torch.matmul(x, w)
            best = float("inf")
            reps = max(1, int(2e9 / (2 * m * k * n)))
            for _ in range(3):
                t = time.perf_counter()
                for _ in range(reps):
                    torch.matmul(x, w)
                best = min(best, (time.perf_counter() - t) / reps)
            rows[f"{m}x{k}x{n} {dtype}"] = round(2 * m * k * n / best / 1e9, 1)
    return {"gflops": rows, "torch_threads": torch.get_num_threads(), "window": [start, time.time()]}


def _train_worker(a: dict) -> dict:
    """One learner micro-batch the way the learner computes it: forward (logits where a response token
    is scored) + log-softmax of the sampled tokens + backward, then an AdamW step (fp32 master
    weights for bf16, as DeepSpeed keeps them); seconds of each part and the matmul share of the
    forward + backward (torch.profiler, self time of mm-family ops)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlsys.math.flops import Shape, forward_flops

    dtype = getattr(torch, a["dtype"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=dtype)
    model.config.use_cache = False
    rows, length, scored = a["rows"], a["length"], a["scored"]
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    master = [p.detach().float().clone().requires_grad_() for p in model.parameters()] if dtype != torch.float32 \
        else list(model.parameters())
    opt = torch.optim.AdamW(master, lr=1e-6)

    def fwd_bwd():
        hidden = model.model(input_ids=ids).last_hidden_state[:, -scored - 1:-1]
        logits = model.lm_head(hidden).float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, -scored:, None]).squeeze(-1)
        (-lp.mean()).backward()

    def step():
        if dtype != torch.float32:
            for m, p in zip(master, model.parameters()):
                m.grad = p.grad.float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        if dtype != torch.float32:
            with torch.no_grad():
                for m, p in zip(master, model.parameters()):
                    p.copy_(m)

    fwd_bwd(); step()
    _barrier(a.get("barrier"), a["index"], a["count"])
    fb, st, start, windows = [], [], time.time(), []
    for _ in range(a["repeats"]):
        t, w = time.perf_counter(), time.time()
        fwd_bwd()
        t1 = time.perf_counter()
        step()
        fb.append(t1 - t)
        st.append(time.perf_counter() - t1)
        windows.append([w, time.time()])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fwd_bwd()
    model.zero_grad(set_to_none=True)
    mm_ops = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in mm_ops)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    flops = 3 * rows * forward_flops(Shape.of(AutoConfig.from_pretrained(a["model"])), length, scored)
    return {"seconds": [x + y for x, y in zip(fb, st)], "fwd_bwd_s": min(fb), "optimizer_s": min(st),
            "fwd_bwd_gflops": round(flops / min(fb) / 1e9, 1), "matmul_share_of_fwd_bwd": round(mm / total, 3),
            "top_ops_ms": {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in top},
            "tokens_per_s": rows * length / (min(fb) + min(st)), "torch_threads": torch.get_num_threads(),
            "window": [start, time.time()], "windows": windows}


WORKERS = {"gen": _gen_worker, "hf": _hf_worker, "matmul": _matmul_worker, "train": _train_worker}


def worker(kind: str, args_json: str) -> None:
    a = json.loads(args_json)
    if a.get("cpus"):
        os.sched_setaffinity(0, a["cpus"])
    out = {"index": a.get("index", 0), "affinity": sorted(os.sched_getaffinity(0)),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
           "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}
    out |= WORKERS[kind](a)
    out |= _loaded()
    print("RESULT " + json.dumps(out), flush=True)


def _prompt_ids(model: str, count: int) -> tuple[str, list[list[int]]]:
    from benchmarks.common import tiny_model
    from benchmarks.rollout import workload_prompts
    from transformers import AutoTokenizer

    if model == "tiny":
        path = tiny_model(384, 8, 6)[0]
        _, texts = workload_prompts("configs/tiny.yaml", count)
    else:
        path, texts = workload_prompts("rlsys/default.yaml", count)
    tok = AutoTokenizer.from_pretrained(path)
    return path, tok(texts, add_special_tokens=False)["input_ids"]


def _busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def _proc_s(pid: int) -> float | None:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """Every 0.25 s: machine busy seconds and our workers' CPU seconds; `foreign` tells how much CPU
    other processes used in a window (a measurement with much foreign load is not one)."""

    def __init__(self, pids: list[int]):
        super().__init__(daemon=True)
        self.pids, self.rows, self.stop, self.last = pids, [], threading.Event(), {}

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in self.pids:
                v = _proc_s(pid)
                if v is not None:
                    self.last[pid] = v
            self.rows.append((time.time(), _busy_s(), sum(self.last.values())))
            time.sleep(0.25)

    def foreign(self, t0: float, t1: float) -> tuple[float, float]:
        """(foreign CPU seconds, window seconds) between t0 and t1."""
        inside = [r for r in self.rows if t0 <= r[0] <= t1]
        if len(inside) < 2:
            return 0.0, t1 - t0
        (a, b0, w0), (b, b1, w1) = inside[0], inside[-1]
        return round((b1 - b0) - (w1 - w0), 2), round(b - a, 2)


def wait_quiet(limit_s: float = 120.0, cores: float = 0.3) -> float:
    """Wait (at most limit_s) until the machine is busy less than `cores` over 2 s; returns that load."""
    end = time.time() + limit_s
    while True:
        b0 = _busy_s()
        time.sleep(2.0)
        load = (_busy_s() - b0) / 2.0
        if load < cores or time.time() > end:
            return round(load, 2)


def launch(kind: str, base: dict, procs: int, env: dict, cpus: list[list[int]] | None, log: Path) -> list[dict]:
    print(f"[tune] machine load before start: {wait_quiet()} cores", file=sys.stderr, flush=True)
    barrier = tempfile.mkdtemp(prefix="rlsys-tune-")
    running = []
    for i in range(procs):
        a = base | {"index": i, "count": procs, "barrier": barrier if procs > 1 else None,
                    "cpus": cpus[i] if cpus else None}
        e = os.environ | env
        f = open(log.with_suffix(f".{i}.log"), "w")
        running.append((subprocess.Popen([sys.executable, __file__, "_worker", kind, json.dumps(a)], env=e,
                                          stdout=subprocess.PIPE, stderr=f, text=True, cwd=REPO), f))
    sampler = Sampler([p.pid for p, _ in running])
    sampler.start()
    results = []
    for p, f in running:
        out, _ = p.communicate()
        f.close()
        lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not lines:
            raise SystemExit(f"worker failed (rc {p.returncode}), see {f.name}")
        results.append(json.loads(lines[-1][7:]))
    sampler.stop.set()
    t0 = max(r["window"][0] for r in results)
    t1 = min(r["window"][1] for r in results)
    for r in results:
        r["foreign_cpu_s"], r["overlap_s"] = sampler.foreign(t0, t1)
        r.pop("window")
        # per repeat: the foreign load (other processes' cores) while it ran; the best clean repeat
        per = [sampler.foreign(*w) for w in r.pop("windows", [])]
        r["foreign_cores"] = [round(f / max(d, 1e-9), 2) for f, d in per]
        clean = [s for s, load in zip(r.get("seconds", []), r["foreign_cores"]) if load < 0.1]
        r["best_clean_s"] = min(clean) if clean else None
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker(sys.argv[2], sys.argv[3])
        return
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=list(WORKERS))
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--env", nargs="*", default=[])
    p.add_argument("--cpus", nargs="*", help="one affinity per process: 0,1 | 0 | 1")
    p.add_argument("--shapes", default="1600x576x1536,1600x1536x576,1600x576x49152,2048x2048x2048")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rows", type=int, default=8, help="train: sequences in the micro-batch")
    p.add_argument("--length", type=int, default=200, help="train: tokens per sequence")
    p.add_argument("--scored", type=int, default=150, help="train: response tokens scored per sequence")
    p.add_argument("--label", default="")
    p.add_argument("--tries", type=int, default=3, help="runs until one had no foreign load (other processes)")
    args = p.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)
    cpus = [[int(c) for c in s.split(",")] for s in args.cpus] if args.cpus else None
    base: dict = {"dtype": args.dtype, "n": args.n, "tokens": args.tokens, "repeats": args.repeats}
    base |= {"rows": args.rows, "length": args.length, "scored": args.scored}
    if args.kind == "train":
        base["model"] = _prompt_ids(args.model, 1)[0]
    elif args.kind in ("gen", "hf"):
        base["model"], base["prompt_ids"] = _prompt_ids(args.model, args.prompts)
    else:
        base["shapes"] = [[int(x) for x in s.split("x")] for s in args.shapes.split(",")]
        base["dtypes"] = args.dtypes.split(",")
    log = Path(tempfile.gettempdir()) / f"rlsys-tune-{args.kind}-{os.getpid()}"
    for attempt in range(args.tries):
        results = launch(args.kind, base, args.procs, env, cpus, log)
        clean = all(r["best_clean_s"] is not None if r["foreign_cores"] else r["foreign_cpu_s"] <= 0.1 * r["overlap_s"]
                    for r in results)
        for r in results:
            print(json.dumps({"label": args.label, "kind": args.kind, "env": env, "clean": clean} | r), flush=True)
        if clean:
            break


if __name__ == "__main__":
    main()
