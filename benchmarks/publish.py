"""Publish a benchmark result: copy it, and its plots, to docs/benchmarks/ under its machine's name.

    python benchmarks/publish.py RESULT.json [--plots DIR] [--partial] [--no-plots]
    python benchmarks/doc_tables.py --write      # then: the tables of docs/benchmarks.md from the new file

The name is machine_slug(result["machine"]) (benchmarks/common.py: vendor, CPU line, uarch, CPU
count) and the run's kind:

- `<slug>-quick.json` / `<slug>-full.json`: a whole `benchmarks/run_all.py [--quick]` run (every
  benchmark run_all runs by default). A run of some of them is refused unless --partial says it
  stands in for the machine's run until a whole one replaces it.
- `<slug>-<sections>-quick.json` / `-full.json`: a result of benchmarks run apart (a script's own
  run, `run_all.py --only weight_sync_link`), named by its sections joined with "+".

The plots (default: the folder draw_plots writes beside the result, RESULT without .json) go to
docs/benchmarks/<the same name>/, replacing what was there. The newest result replaces the
published one (git keeps the history); an older one than the published is refused. Refused too,
naming why: a result with benchmarks that failed (`failed`), one that check_result rejects, one
whose machine has no uarch (written before machine() recorded it: --cpu-from-this-machine adds this
machine's CPU fields to a result written here, same CPU name, count and platform), and one without
plots unless --no-plots.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, _cpu, check_result, machine, machine_slug  # noqa: E402

DOCS = REPO / "docs" / "benchmarks"
RUN_ALL = ("rollout", "reward", "learner", "packing", "weight_sync", "end_to_end", "overlap", "scaling", "limits")
"""What `benchmarks/run_all.py` runs by default (its BENCHMARKS, checked by tests/test_bench_published.py):
named here so that publishing does not import every benchmark."""


class Refused(ValueError):
    pass


def published_name(result: dict, partial: bool = False) -> str:
    """The file name (without .json) a result is published under; raises Refused when it cannot be.

    >>> m = {"cpu": "AMD EPYC", "vendor": "amd", "uarch": "zen4", "cpus": 2}
    >>> published_name({"quick": True, "machine": m, "benchmarks": dict.fromkeys(RUN_ALL)})
    'amd-epyc-zen4-2cpu-quick'
    >>> published_name({"quick": False, "machine": m, "benchmarks": {"weight_sync_link": {}}})
    'amd-epyc-zen4-2cpu-weight_sync_link-full'
    >>> published_name({"quick": True, "machine": m, "benchmarks": {"reward": {}}}, partial=True)
    'amd-epyc-zen4-2cpu-quick'
    """
    if not result["machine"].get("uarch"):
        raise Refused("its machine has no uarch (written before benchmarks/common.py machine() recorded the CPU's "
                      "family and model): run it again")
    kind = "quick" if result["quick"] else "full"
    sections = list(result["benchmarks"])
    missing = [s for s in RUN_ALL if s not in sections]
    if not missing or partial:
        return f"{machine_slug(result['machine'])}-{kind}"
    if any(s in RUN_ALL for s in sections):
        raise Refused(f"a run of {', '.join(sections)} lacks {', '.join(missing)} of run_all's benchmarks: publish "
                      f"a whole run, or pass --partial to let this one stand in for the machine's {kind} run")
    return f"{machine_slug(result['machine'])}-{'+'.join(sections)}-{kind}"


def cpu_from_this_machine(result: dict, here: dict | None = None) -> dict:
    """result with this machine's CPU fields (vendor, family, model, flags, uarch) added to a machine
    that lacks them, when it is this machine as far as the result says (CPU name, count, platform)."""
    m, here = result["machine"], here or machine()
    if m.get("uarch"):
        return result
    differ = [k for k in ("cpu", "cpus", "platform") if m.get(k) != here.get(k)]
    if differ:
        raise Refused("--cpu-from-this-machine: the result was not written on this machine ("
                      + ", ".join(f"{k} {m.get(k)!r} here {here.get(k)!r}" for k in differ) + ")")
    cpu = {k: v for k, v in here.items() if k in _cpu("")}
    added = {k: v for k, v in cpu.items() if k not in m}
    return {**result, "machine": {**m, **added, "cpu_added": (
        f"{', '.join(added)} added by benchmarks/publish.py --cpu-from-this-machine: the result names this "
        f"machine's CPU, CPU count and platform")}}


def publish(result_path: Path, plots: Path | None = None, partial: bool = False, no_plots: bool = False,
            docs: Path = DOCS, cpu_here: bool = False) -> Path:
    """Copy result_path (and its plots) into docs; returns the published JSON's path."""
    result = json.loads(Path(result_path).read_text())
    if cpu_here:
        result = cpu_from_this_machine(result)
    if result.get("failed"):
        raise Refused("benchmarks failed in this run: " + "; ".join(f"{k}: {v}" for k, v in result["failed"].items()))
    try:
        check_result(result)
    except ValueError as e:
        raise Refused(str(e)) from None
    name = published_name(result, partial)
    out = docs / f"{name}.json"
    if out.exists():
        old = json.loads(out.read_text()).get("created", "")
        if _when(old) > _when(result["created"]):
            raise Refused(f"{out.relative_to(REPO) if out.is_relative_to(REPO) else out} is newer ({old}) than this "
                          f"result ({result['created']})")
    plots = Path(result_path).with_suffix("") if plots is None else Path(plots)
    pngs = sorted(plots.glob("*.png")) if plots.is_dir() else []
    if not pngs and not no_plots:
        raise Refused(f"no plots in {plots} (draw them with `python benchmarks/plots.py {result_path}`, name "
                      f"their folder with --plots, or publish without them: --no-plots)")
    docs.mkdir(parents=True, exist_ok=True)
    if cpu_here:
        out.write_text(json.dumps(result, indent=1))
    else:
        shutil.copyfile(result_path, out)
    plot_dir = docs / name
    if plot_dir.exists():
        shutil.rmtree(plot_dir)  # the newest run's plots only: an old plot beside a new result would mislead
    if pngs:
        plot_dir.mkdir()
        for png in pngs:
            shutil.copyfile(png, plot_dir / png.name)
    return out


def _when(created: str) -> float:
    import datetime

    try:
        return datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return 0.0


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="a result JSON (benchmarks/results/<timestamp>.json)")
    parser.add_argument("--plots", type=Path, help="its plots' folder (default: RESULT without .json)")
    parser.add_argument("--partial", action="store_true",
                        help="a run of some of run_all's benchmarks stands in for the machine's quick/full run")
    parser.add_argument("--no-plots", action="store_true", help="publish a result that has no plots")
    parser.add_argument("--cpu-from-this-machine", action="store_true",
                        help="a result written here before machine() recorded the CPU's family and model: add them")
    args = parser.parse_args(argv)
    try:
        out = publish(args.result, args.plots, args.partial, args.no_plots, cpu_here=args.cpu_from_this_machine)
    except Refused as e:
        sys.exit(f"not published: {args.result}: {e}")
    rel = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    print(f"published {rel}" + (f" and its plots in {rel.with_suffix('')}/" if out.with_suffix("").is_dir() else ""))
    print("next: python benchmarks/doc_tables.py --write (the tables of it in docs/), then commit docs/")
    return out


if __name__ == "__main__":
    main()
