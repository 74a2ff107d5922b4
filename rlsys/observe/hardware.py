"""The machine's FLOP/s peaks, from the machine itself: what MFU is judged against.

Two numbers per precision, both of the cores this process may use (os.sched_getaffinity):

- an ESTIMATE from the instruction set: FLOP/cycle/core for the widest vector or matrix unit the
  CPU reports (/proc/cpuinfo flags) x physical cores x clock (cpufreq's maximum, else cpuinfo's
  MHz). It assumes what the flags cannot say (two FMA pipes per core, the clock held under load,
  vCPUs that are whole cores), so it is labelled an estimate and shown beside, not divided by;
- a MEASURED matmul roofline: large square torch.matmul on those cores (all of them as threads),
  best of a few repeats, about a second per precision. MFU divides by this one: it means the same
  thing on every machine (the share of what this machine's BLAS does at its best), whatever the
  estimate gets wrong. Other work on the machine lowers it (and so raises MFU): a benchmark
  measures it more than once and keeps the best (best_of).

FLOP/cycle/core used by the estimate (a multiply-add is 2 FLOPs):
  float32  AVX-512 (avx512f): 16 lanes x 2 FMA pipes x 2 = 64; AMD Zen 4 (family 0x19) runs
           512-bit ops on 256-bit pipes: 32.  AVX2 + FMA: 8 x 2 x 2 = 32.  AVX without FMA: 16.
           SSE: 8.
  bfloat16 AMX (amx_bf16): one TDPBF16PS tile op (16x16x32 multiply-adds) per 16 cycles = 1024.
           AVX512_BF16 (vdpbf16ps: 2 products per fp32 lane): twice the fp32 rate.  Otherwise
           bf16 is computed through fp32: the fp32 rate.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuInfo:
    vendor: str
    family: int | None
    model_name: str
    flags: frozenset[str]
    mhz: float | None
    model: int | None = None
    """cpuinfo's model number (with the family it names the microarchitecture)."""

    @classmethod
    def parse(cls, text: str) -> "CpuInfo":
        """The first processor block of /proc/cpuinfo."""
        fields: dict[str, str] = {}
        for line in text.splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        family, model = fields.get("cpu family"), fields.get("model")
        mhz = fields.get("cpu MHz")
        return cls(vendor=fields.get("vendor_id", ""), family=int(family) if family and family.isdigit() else None,
                   model_name=fields.get("model name", ""), flags=frozenset(fields.get("flags", "").split()),
                   mhz=float(mhz) if mhz else None, model=int(model) if model and model.isdigit() else None)


@dataclass(frozen=True)
class IsaRate:
    """FLOP/cycle/core per precision and which unit gives it."""
    float32: int
    bfloat16: int
    float32_unit: str
    bfloat16_unit: str


def isa_rate(cpu: CpuInfo) -> IsaRate:
    f = cpu.flags
    if "avx512f" in f:
        zen4 = cpu.vendor == "AuthenticAMD" and cpu.family == 0x19
        fp32, unit = (32, "AVX-512 on 256-bit pipes (AMD Zen 4), 2 FMA") if zen4 else (64, "AVX-512, 2 FMA pipes (assumed)")
    elif "avx2" in f and "fma" in f:
        fp32, unit = 32, "AVX2 + FMA, 2 FMA pipes (assumed)"
    elif "avx" in f:
        fp32, unit = 16, "AVX, separate mul and add"
    else:
        fp32, unit = 8, "SSE"
    if "amx_bf16" in f and "amx_tile" in f:
        bf16, bunit = 1024, "AMX tiles (amx_bf16)"
    elif "avx512_bf16" in f:
        bf16, bunit = 2 * fp32, "AVX512_BF16 dot products (2x fp32)"
    else:
        bf16, bunit = fp32, "no bf16 unit: through fp32"
    return IsaRate(fp32, bf16, unit, bunit)


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def physical_cores(cpus: list[int], sys_cpu: Path = Path("/sys/devices/system/cpu")) -> int:
    """Distinct (package, core) among these logical CPUs, as the OS reports them (a VM's vCPUs that
    are hyper-threads of one core on the host count as two)."""
    seen = set()
    for c in cpus:
        topo = sys_cpu / f"cpu{c}" / "topology"
        try:
            seen.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            seen.add(("?", str(c)))
    return len(seen)


def clock_ghz(cpu: CpuInfo, sys_cpu: Path = Path("/sys/devices/system/cpu")) -> tuple[float | None, str]:
    try:
        khz = int((sys_cpu / "cpu0" / "cpufreq" / "cpuinfo_max_freq").read_text())
        return khz / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    if cpu.mhz:
        return cpu.mhz / 1e3, "/proc/cpuinfo cpu MHz"
    return None, "unknown"


def estimate(cpu: CpuInfo, cores: int, ghz: float) -> dict:
    """Theoretical peak FLOP/s per precision from the ISA (an estimate: see the module notes)."""
    rate = isa_rate(cpu)
    return {"float32": rate.float32 * cores * ghz * 1e9, "bfloat16": rate.bfloat16 * cores * ghz * 1e9,
            "flop_per_cycle_core": {"float32": rate.float32, "bfloat16": rate.bfloat16},
            "units": {"float32": rate.float32_unit, "bfloat16": rate.bfloat16_unit}, "cores": cores, "ghz": ghz}


def cpu_estimate(cpuinfo: str | None = None) -> dict:
    """This machine's estimate, with how it was reached (for the result file)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no flags, no clock, an estimate of 0 (shown as such)
            cpuinfo = ""
    text = cpuinfo
    cpu = CpuInfo.parse(text)
    cpus = usable_cpus()
    cores = physical_cores(cpus)
    ghz, source = clock_ghz(cpu)
    out = estimate(cpu, cores, ghz or 0.0)
    out |= {"cpu": cpu.model_name, "vendor": cpu.vendor, "family": cpu.family, "logical_cpus": len(cpus),
            "clock_source": source, "label": "estimate from ISA flags x cores x clock (not measured)"}
    return out


def matmul_roofline(dtypes: tuple[str, ...] = ("float32", "bfloat16"), device: str | None = None,
                    seconds: float = 1.0, repeats: int = 5) -> dict:
    """Best FLOP/s of a large square torch.matmul per precision, on every CPU thread this process
    may use (or on the GPU when device="cuda"). The size grows until one product takes ~50 ms, so
    call overheads do not count; then the best of `repeats` (stopping early past `seconds`)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(len(usable_cpus()))
    cap = 16384 if device == "cuda" else 8192

    def run(a, b) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    out = {}
    busy0, own0, t0 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
    try:
        for name in dtypes:
            dtype = getattr(torch, name)
            n = 1024
            while True:
                a = torch.randn(n, n, dtype=dtype, device=device)
                b = torch.randn(n, n, dtype=dtype, device=device)
                run(a, b)  # first call: packing, kernel choice
                took = min(run(a, b), run(a, b))
                if took >= 0.05 or n >= cap:
                    break
                n *= 2
            best, start = took, time.perf_counter()
            for _ in range(repeats):
                best = min(best, run(a, b))
                if time.perf_counter() - start > seconds:
                    break
            out[name] = 2 * n ** 3 / best
            out.setdefault("n", {})[name] = n
    finally:
        if device == "cpu":
            torch.set_num_threads(threads)
    other = None
    if busy0 is not None:  # what other processes ran meanwhile, in cores (they lower the roofline)
        other = round(max(0.0, (_machine_busy_s() - busy0) - (_own_cpu_s() - own0)) / (time.perf_counter() - t0), 2)
    out |= {"device": device, "threads": len(usable_cpus()) if device == "cpu" else None, "other_load_cores": other,
            "label": "measured: best square torch.matmul on the usable cores"}
    return out


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (/proc/stat), None off Linux."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def best_of(*rooflines: dict) -> dict:
    """Per precision the highest of several roofline measurements (a machine shared with other work
    measures low at times; the peak is what it reaches at its best)."""
    out = dict(rooflines[0])
    for r in rooflines[1:]:
        for k in ("float32", "bfloat16"):
            if k in r and r[k] > out.get(k, 0):
                out[k] = r[k]
                out["n"] = {**out.get("n", {}), k: r["n"][k]}
    out["measurements"] = [{k: r[k] for k in ("float32", "bfloat16", "other_load_cores") if k in r} for r in rooflines]
    loads = [r.get("other_load_cores") for r in rooflines if r.get("other_load_cores") is not None]
    out["other_load_cores"] = min(loads) if loads else None
    return out


def linear_shapes(shape) -> list[tuple[int, int, int]]:
    """(K, N, count) of every weight matrix a forward multiplies activations by (rlsys.math.flops.Shape):
    per layer q, k, v, o and the MLP's, then the output layer once.

    >>> from rlsys.math.flops import Shape
    >>> linear_shapes(Shape(8, 2, 2, 1, 4, 16, 10))
    [(8, 8, 2), (8, 4, 4), (8, 8, 2), (8, 16, 4), (16, 8, 2), (8, 10, 1)]
    """
    h, q, kv, i, L = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, \
        shape.intermediate, shape.layers
    mlp_in = 2 if shape.gated_mlp else 1
    return [(h, q, L), (h, kv, 2 * L), (q, h, L), (h, i, mlp_in * L), (i, h, L), (h, shape.vocab, 1)]


def model_matmul_rate(shape, tokens: int, dtype: str, backward: bool, head_tokens: int | None = None,
                      seconds: float = 0.2, repeats: int = 3) -> dict:
    """FLOP/s of this model's own matrix products on every usable core: each distinct weight shape
    (linear_shapes) multiplied by `tokens` rows of activations, with `backward` also the two
    products of its backward pass (dX = dY W, dW = dY^T X); the output layer at `head_tokens` rows
    (the learner scores its tokens in chunks; None: `tokens`). Each shape's best time of `repeats`
    (each at least `seconds` of calls), weighted by how often the model has it: the matmul roofline
    at the model's shapes, the denominator of the learner's MFU. Small models multiply thin
    matrices (K, N in the hundreds), further from a square product's rate. Measured per shape, not
    per layer: at thousands of rows a product is compute-bound, so one copy of a weight is enough."""
    import torch

    dt = getattr(torch, dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(len(usable_cpus()))
    flops = took = 0.0
    try:
        for k, n, count in linear_shapes(shape):
            m = head_tokens if n == shape.vocab and head_tokens is not None else tokens
            x, w, dy = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt), torch.randn(m, n, dtype=dt)

            def once() -> None:
                torch.matmul(x, w)
                if backward:
                    torch.matmul(dy, w.T)   # dX: (m, n) x (n, k)
                    torch.matmul(x.T, dy)   # dW: (k, m) x (m, n)

            once()  # first call: packing, kernel choice
            best = float("inf")
            for _ in range(repeats):
                start, runs = time.perf_counter(), 0
                while time.perf_counter() - start < seconds:
                    once()
                    runs += 1
                best = min(best, (time.perf_counter() - start) / runs)
            flops += count * 2 * m * k * n * (3 if backward else 1)
            took += count * best
    finally:
        torch.set_num_threads(threads)
    return {"flops_per_s": flops / took, "flops": flops, "seconds": took, "tokens": tokens, "dtype": dtype,
            "backward": backward, "head_tokens": head_tokens}


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 3) -> dict:
    """Main-memory bandwidth on every usable core, bytes/s, over a buffer far larger than any cache:
    `read` a sum over it (each byte read once), `copy` a copy into a second buffer (read + write:
    2 x nbytes moved). The best of `repeats` each."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(len(usable_cpus()))
    try:
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src), src.sum()  # first touch of both buffers
        read = copy = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            src.sum()
            read = min(read, time.perf_counter() - t)
            t = time.perf_counter()
            dst.copy_(src)
            copy = min(copy, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return {"read": nbytes / read, "copy": 2 * nbytes / copy, "bytes": nbytes}


def describe(peak: dict) -> str:
    return ", ".join(f"{k} {peak[k] / 1e12:.3g} TFLOP/s" for k in ("float32", "bfloat16") if k in peak)


__all__ = ["CpuInfo", "IsaRate", "isa_rate", "estimate", "cpu_estimate", "matmul_roofline", "physical_cores",
           "clock_ghz", "usable_cpus", "describe", "best_of",
           "linear_shapes", "model_matmul_rate", "memory_bandwidth"]
