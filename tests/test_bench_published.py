"""The published figures are the committed results.

- Every file in docs/benchmarks/*.json is a result that check_result accepts, with no failed
  benchmark, named by its machine and kind: `<machine_slug>-quick.json` / `-full.json` for a
  benchmarks/run_all.py run, `<machine_slug>-<its sections joined by +>-quick.json` / `-full.json`
  for benchmarks run apart (benchmarks/publish.py writes them so).
- Every bench-table block of the docs' pages (`<!-- bench-table benchmarks/FILE.json ... -->` ...
  `<!-- /bench-table -->`, the path relative to docs/) is exactly what benchmarks/doc_tables.py
  renders from its committed file: every figure a table cites is the file's value, reference,
  ratio and range.
- The rule for tables: no markdown table of the benchmark pages (docs/benchmarks.md and its
  history) stands outside a bench-table block unless the line right above it is
  `<!-- not-measured: why -->` (a table of settings or commands, no measured figure). Measured
  figures with no committed results file are not tabulated: the history is told in prose and kept
  in git.
- Every docs/benchmarks/ file README.md and the docs' pages name (plots, results) exists.

No Ray, no torch: well under a second.
"""

import ast
import json
import re
from pathlib import Path

import pytest

from benchmarks import doc_tables, publish
from benchmarks.common import Figure, Section, _cpu, check_result, machine_slug

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks"
README = REPO / "README.md"
BENCH_PAGES = [REPO / "docs" / "benchmarks.md", REPO / "docs" / "benchmarks-history.md"]
NOT_MEASURED = re.compile(r"^<!-- not-measured: .+ -->$")


def _results() -> list[Path]:
    return sorted(DOCS.glob("*.json"))


def test_committed_results_are_valid_and_named_by_their_machine():
    assert _results(), "docs/benchmarks holds no results"
    for path in _results():
        result = json.loads(path.read_text())
        check_result(result)
        assert not result.get("failed"), f"{path.name}: benchmarks failed in it: {result['failed']}"
        m = result["machine"]
        assert m.get("uarch") and m.get("vendor"), f"{path.name}: its machine names no vendor or uarch"
        kind = "quick" if result["quick"] else "full"
        slug = machine_slug(m)
        named = {f"{slug}-{kind}", f"{slug}-{'+'.join(result['benchmarks'])}-{kind}"}
        assert path.stem in named, f"{path.name}: a {kind} run on {slug} of {list(result['benchmarks'])} is " \
                                   f"published as one of {sorted(named)}"


def test_publish_knows_what_run_all_runs():
    """publish.RUN_ALL (what a whole run holds) is run_all.BENCHMARKS's keys, read without importing them."""
    tree = ast.parse((REPO / "benchmarks" / "run_all.py").read_text())
    keys = next([k.value for k in node.value.keys] for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "BENCHMARKS")
    assert tuple(keys) == publish.RUN_ALL


def test_bench_tables_are_rendered_from_the_committed_results():
    pages = doc_tables.pages()
    assert set(BENCH_PAGES) <= set(pages), f"the benchmark pages hold no bench-table block: {pages}"
    for page in pages:
        for block in doc_tables.blocks(page.read_text()):
            path, _ = doc_tables.parse_spec(block["spec"])
            assert (page.parent / path).resolve().parent == DOCS, f"{page.name}: {path}: a bench-table renders a " \
                                                                  "file of docs/benchmarks"
            rendered = doc_tables.render(block["spec"], page.parent)
            assert block["body"] == rendered, (f"{page.name}'s bench-table of {block['spec']} is stale: run python "
                                               f"benchmarks/doc_tables.py --write\n--- page\n{block['body']}"
                                               f"\n--- rendered\n{rendered}")


def test_no_measured_table_stands_outside_a_bench_table_block():
    for page in BENCH_PAGES:
        outside = doc_tables.BLOCK.sub("", page.read_text()).splitlines()
        for i, line in enumerate(outside):
            if line.startswith("|") and i + 1 < len(outside) and re.match(r"^\|\s*:?-{3,}", outside[i + 1]):
                above = outside[i - 1] if i else ""
                assert NOT_MEASURED.match(above), (f"{page.name}: the table {line[:80]!r} stands outside a "
                                                   f"bench-table block and is not marked <!-- not-measured: why -->")


def test_every_docs_benchmarks_file_named_exists():
    # README names them from the repository (docs/benchmarks/...), the pages from docs/ (benchmarks/...);
    # a path after "REV:" is a file in git history (`git show 2b49940:docs/benchmarks/...`), not a link
    named = set(re.findall(r"(?<![:\w/])docs/benchmarks/[\w.+/-]+\.(?:png|json)", README.read_text()))
    for page in sorted((REPO / "docs").glob("*.md")):
        named |= {"docs/" + p for p in re.findall(r"(?<![:\w/])benchmarks/[\w.+/-]+\.(?:png|json)", page.read_text())}
    assert named
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"the docs name files that are not in docs/benchmarks: {missing}"


# ---------------------------------------------------------------- the tools, on files made here

def _result(tmp_path: Path, created="2026-12-05T10:00:00+0000", sections=("reward",), **extra) -> Path:
    fig = Figure.repeated("reward pool, 2 workers samples/s", [110.0, 120.0, 90.0], "samples/s",
                          "1 worker, same samples", [100.0, 100.0, 100.0], target=1.0)
    benches = {name: Section(name, {}, [fig], seconds=3.0).to_json() for name in sections}
    result = {"schema": "rlsys-bench/1", "created": created, "quick": True,
              "machine": {"cpu": "AMD EPYC", "vendor": "amd", "family": 25, "model": 17, "flags": ["avx512f"],
                          "uarch": "zen4", "cpus": 2, "packages": {"torch": "2.13.0+cpu"}},
              "hardware": {}, "benchmarks": benches, **extra}
    check_result({k: v for k, v in result.items() if k != "failed"})
    path = tmp_path / f"run-{len(list(tmp_path.glob('run-*.json')))}.json"
    path.write_text(json.dumps(result))
    (plots := path.with_suffix("")).mkdir()
    (plots / "reward.png").write_bytes(b"png " + created.encode())
    return path


def test_publish_names_copies_and_refuses(tmp_path):
    docs = tmp_path / "docs"
    with pytest.raises(publish.Refused, match="lacks rollout"):
        publish.publish(_result(tmp_path), docs=docs)
    out = publish.publish(_result(tmp_path), partial=True, docs=docs)
    assert out == docs / "amd-epyc-zen4-2cpu-quick.json"
    assert (docs / "amd-epyc-zen4-2cpu-quick" / "reward.png").read_bytes().endswith(b"10:00:00+0000")
    # the newest replaces, plots included; an older one is refused
    publish.publish(_result(tmp_path, created="2026-12-05T11:00:00+0000"), partial=True, docs=docs)
    assert json.loads(out.read_text())["created"].startswith("2026-12-05T11")
    assert (docs / "amd-epyc-zen4-2cpu-quick" / "reward.png").read_bytes().endswith(b"11:00:00+0000")
    with pytest.raises(publish.Refused, match="is newer"):
        publish.publish(_result(tmp_path, created="2026-12-05T09:00:00+0000"), partial=True, docs=docs)
    # benchmarks run apart get their sections in the name
    assert publish.publish(_result(tmp_path, sections=("weight_sync_link",)), docs=docs).name == \
        "amd-epyc-zen4-2cpu-weight_sync_link-quick.json"
    with pytest.raises(publish.Refused, match="benchmarks failed in this run: learner: RuntimeError"):
        publish.publish(_result(tmp_path, created="2026-12-05T12:00:00+0000",
                                failed={"learner": "RuntimeError: boom"}), partial=True, docs=docs)
    bad = _result(tmp_path, created="2026-12-05T13:00:00+0000")
    result = json.loads(bad.read_text())
    result["benchmarks"]["reward"]["figures"][0]["ratio"] = 5.0
    bad.write_text(json.dumps(result))
    with pytest.raises(publish.Refused, match="does not follow from the samples"):
        publish.publish(bad, partial=True, docs=docs)
    no_plots = _result(tmp_path, created="2026-12-05T14:00:00+0000")
    (no_plots.with_suffix("") / "reward.png").unlink()
    with pytest.raises(publish.Refused, match="no plots in"):
        publish.publish(no_plots, partial=True, docs=docs)


def test_publish_adds_the_cpu_only_to_a_result_of_this_machine(tmp_path):
    old = _result(tmp_path)
    result = json.loads(old.read_text())
    here = {"cpu": "AMD EPYC", "cpus": 2, "platform": "Linux-x", "vendor": "amd", "family": 25, "model": 17,
            "flags": ["avx512f"], "uarch": "zen4", "python": "3.11.7"}
    result["machine"] = {"cpu": "AMD EPYC", "cpus": 2, "platform": "Linux-x", "packages": {}}
    with pytest.raises(publish.Refused, match="no uarch"):
        publish.published_name(result)
    added = publish.cpu_from_this_machine(result, here)["machine"]
    assert added["uarch"] == "zen4" and added["family"] == 25 and "python" not in added and "cpu_added" in added
    with pytest.raises(publish.Refused, match="not written on this machine .*platform 'Linux-y'"):
        publish.cpu_from_this_machine({**result, "machine": {**result["machine"], "platform": "Linux-y"}}, here)


def test_a_stale_page_is_caught_and_rewritten(tmp_path, capsys):
    docs = tmp_path / "docs"
    (docs / "benchmarks").mkdir(parents=True)
    src = _result(tmp_path)
    (docs / "benchmarks" / "x-quick.json").write_text(src.read_text())
    (docs / "benchmarks" / "x-quick").mkdir()
    (docs / "benchmarks" / "x-quick" / "reward.png").write_bytes(b"png")
    page = docs / "benchmarks.md"
    page.write_text("# Benchmarks\n\n<!-- bench-table benchmarks/x-quick.json -->\n<!-- /bench-table -->\n")
    fresh = doc_tables.rewrite(page.read_text(), docs)
    assert "| reward pool, 2 workers samples/s | 110 (90.0-120) samples/s | 1 worker, same samples: 100 samples/s " \
           "| 1.10 (0.90-1.20) | 3 | >= 1: missed by 10% (lowest 0.90) |" in fresh
    assert "![reward](benchmarks/x-quick/reward.png)" in fresh
    assert doc_tables.rewrite(fresh, docs) == fresh
    stale = fresh.replace("1.10 (0.90-1.20)", "1.12 (0.90-1.20)")
    with pytest.raises(ValueError, match="do not pair up"):
        doc_tables.blocks(fresh.replace("<!-- /bench-table -->", ""))
    with pytest.raises(ValueError, match="has no section learner"):
        doc_tables.rewrite(fresh.replace("x-quick.json -->", "x-quick.json sections=learner -->"), docs)
    assert doc_tables.pages(docs) == [page]
    # the command line: --check exits 1 with the diff, --write mends it
    page.write_text(stale)
    assert doc_tables.main(["--check", "--page", str(page)]) == 1
    assert "-| reward pool" in capsys.readouterr().out
    assert doc_tables.main(["--write", "--page", str(page)]) == 0
    assert page.read_text() == fresh
    assert doc_tables.main(["--check", "--page", str(page)]) == 0


AMX = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile

processor\t: 1
vendor_id\t: GenuineIntel
"""


def test_machine_names_its_cpu():
    cpu = _cpu(AMX)
    assert cpu == {"cpu": "Intel(R) Xeon(R) Processor", "vendor": "intel", "family": 6, "model": 143,
                   "flags": ["avx512f", "avx512_bf16", "amx_bf16"], "uarch": "amx"}
    assert machine_slug({**cpu, "cpus": 2}) == "intel-xeon-amx-2cpu"
    zen5 = _cpu(AMX.replace("GenuineIntel", "AuthenticAMD").replace(": 6\n", ": 26\n").replace("Intel(R) Xeon(R)",
                                                                                             "AMD EPYC 9B45"))
    assert zen5["uarch"] == "zen5" and machine_slug({**zen5, "cpus": 4}) == "amd-epyc-zen5-4cpu"
