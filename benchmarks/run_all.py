"""Every benchmark, one after the other, into one JSON and its plots.

    python benchmarks/run_all.py [--quick] [--only rollout,reward,...]

weight_sync_link and scaling_link (the same on isolated nodes with shaped links: root, see
rlsys/cluster/isolation.py) run only when --only names them, at LINK_RATES Mb/s.

Writes benchmarks/results/<timestamp>.json (schema in benchmarks/common.py: every figure with its
reference, measured in the same run, and their ratio; each target met or missed, by how much)
and benchmarks/results/<timestamp>/*.png. Prints each benchmark's table as it finishes and a
summary of the targets at the end (met only when the lowest repeat meets it). A benchmark that
raises is printed with its traceback and the others still run; the JSON is rewritten after every
benchmark, so whatever finished is on disk even if the run is killed. Each plot is drawn on its
own: one that fails is printed with its error, the others are still written. The run exits 1
naming every benchmark and plot that failed. --quick took 54 minutes on a 2-vCPU AMD EPYC (Zen 4).
Run it on an otherwise idle machine: every side of every ratio shares the same cores.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import end_to_end, learner, limits, overlap, packing, reward, rollout, scaling, weight_sync  # noqa: E402
from benchmarks.common import REPO, Section, timed_sections, write_result  # noqa: E402
from benchmarks.plots import draw_plots  # noqa: E402

BENCHMARKS = {"rollout": rollout.run, "reward": reward.run, "learner": learner.run, "packing": packing.run,
              "weight_sync": weight_sync.run, "end_to_end": end_to_end.run, "overlap": overlap.run,
              "scaling": scaling.run, "limits": limits.run}
LINK_RATES = [10000.0, 1000.0]  # Mb/s: 10 and 1 Gb/s
OPTIONAL = {"weight_sync_link": functools.partial(weight_sync.run_link, link=LINK_RATES),
            "scaling_link": functools.partial(scaling.run_link, link=LINK_RATES)}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (< 20 min here)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)} (or of "
                                       f"{','.join(OPTIONAL)}, which run only when named)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<timestamp>.json)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    chosen = BENCHMARKS | OPTIONAL
    unknown = [n for n in names if n not in chosen]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(chosen)}")
    start = time.perf_counter()
    out = args.out or REPO / "benchmarks" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    sections: list[Section] = []
    failed: dict[str, str] = {}
    for name in names:
        try:
            got = timed_sections(chosen[name], args.quick)
        except Exception as e:  # noqa: BLE001 - reported below and in the exit status; the others still run
            traceback.print_exc()
            print(f"benchmark {name} FAILED: {type(e).__name__}: {e}", flush=True)
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            continue
        for section in got:
            print(section.table(), flush=True)
            sections.append(section)
        write_result(sections, out, args.quick)  # after each benchmark: what finished survives a kill
    if not sections:
        sys.exit("no benchmark finished: " + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    plots = draw_plots(out)  # each plot on its own: one that fails is printed, the others written
    print(f"\n{len(sections)} benchmarks in {(time.perf_counter() - start) / 60:.1f} min; wrote {out}")
    print("plots: " + ", ".join(str(p) for p in plots.written))
    print(targets(sections))
    problems = [f"benchmark {n}: {e}" for n, e in failed.items()]
    problems += [f"plot {n}: {e} (a bug in benchmarks/plots.py)" for n, e in plots.failed.items()]
    if problems:
        sys.exit(f"FAILED ({out} and the plots above are written): " + "; ".join(problems))
    return out


def targets(sections: list[Section]) -> str:
    lines = ["targets:"]
    for s in sections:
        for f in s.figures:
            if f.target is not None:
                lo, hi = f.ratio_range
                verdict = "met" if lo >= f.target else f"MISSED by {100 * (1 - lo / f.target):.0f}% (lowest repeat)"
                spread = f", {lo:.2f}-{hi:.2f} over {len(f.ratios)} repeats" if len(f.ratios) > 1 else ""
                lines.append(f"  {f.name}: {f.ratio:.2f}x{spread} (target {f.target:g}x) {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
