"""Every plot of benchmarks/plots.py drawn from a real quick run's result (tests/data/bench-quick.json,
its "source" says where each section was measured), and a plot that raises reported by name while
the others are still written, by draw_plots, plot_all and run_all alike. Matplotlib Agg, seconds."""

import json
from pathlib import Path

import pytest

from benchmarks.common import Figure, Section, check_result
from benchmarks.plots import PLOTS, PlotsFailed, _weight_sync, draw_plots, plot_all

DATA = Path(__file__).parent / "data" / "bench-quick.json"
PNG = b"\x89PNG\r\n\x1a\n"


def _result(tmp_path: Path, break_it=None) -> Path:
    """A copy of the quick result in tmp_path (its plots go to tmp_path/bench-quick/), changed by break_it."""
    result = json.loads(DATA.read_text())
    if break_it:
        break_it(result["benchmarks"])
    path = tmp_path / DATA.name
    path.write_text(json.dumps(result))
    return path


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 5000  # an empty 800x450 canvas alone is ~3 KB


def test_the_quick_result_has_a_section_for_every_plot():
    result = json.loads(DATA.read_text())
    check_result(result)
    assert set(PLOTS) <= set(result["benchmarks"]), f"no data to draw {set(PLOTS) - set(result['benchmarks'])}"
    assert set(result["source"]) == set(result["benchmarks"]), "every section says where it was measured"
    assert any("zero3_two_ranks" in r for r in result["benchmarks"]["weight_sync"]["rows"])
    assert any("handle" in r.get("repeats_s", {}) for r in result["benchmarks"]["weight_sync"]["rows"])  # by handle
    assert DATA.stat().st_size < 128_000  # one whole quick run (97 KB in one line), kept small enough to read in review


def test_every_plot_is_drawn_from_a_real_quick_result(tmp_path):
    path = _result(tmp_path)
    written = plot_all(path)  # raises PlotsFailed if any plot failed
    assert sorted(p.name for p in written) == sorted(f"{name}.png" for name in [*PLOTS, "targets"])
    for png in written:
        assert png.parent == tmp_path / "bench-quick" and _is_png(png), png


def test_the_zero3_weight_sync_row_is_drawn_as_its_own_points():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = json.loads(DATA.read_text())["benchmarks"]["weight_sync"]
    fig, ax = plt.subplots()
    _weight_sync(ax, bench)
    labels = ax.get_legend_handles_labels()[1]
    plt.close(fig)
    sharded = [label for label in labels if "ZeRO-3" in label]
    assert len(sharded) == 2 and any("gathers" in s for s in sharded) and any("each sends" in s for s in sharded)


def _drop_raw_s(benches: dict) -> None:
    del benches["weight_sync"]["rows"][0]["raw_s"]


def test_a_plot_that_raises_is_reported_and_the_others_written(tmp_path, capsys):
    path = _result(tmp_path, _drop_raw_s)
    plots = draw_plots(path)
    assert plots.failed == {"weight_sync": "KeyError: 'raw_s'"}
    assert "plot weight_sync FAILED" in capsys.readouterr().err
    assert sorted(p.stem for p in plots.written) == sorted({*PLOTS, "targets"} - {"weight_sync"})
    assert all(_is_png(p) for p in plots.written)
    assert not (tmp_path / "bench-quick" / "weight_sync.png").exists()
    with pytest.raises(PlotsFailed, match="weight_sync: KeyError: 'raw_s'"):
        plot_all(path)


def test_run_all_writes_the_json_and_other_plots_then_exits_naming_the_failed_one(tmp_path, monkeypatch):
    """run_all with its benchmarks replaced by the quick result's sections (no benchmark runs)."""
    from benchmarks import run_all

    benches = json.loads(DATA.read_text())["benchmarks"]
    _drop_raw_s(benches)

    def replay(quick: bool) -> list[Section]:
        return [Section(name, s["params"], [Figure(f["name"], f["value"], f["unit"], f["reference"]["name"],
                                                   f["reference"]["value"], f["lower_is_better"],
                                                   f["target"] and f["target"]["min_ratio"], f["note"])
                                            for f in s["figures"]], s["rows"], s["seconds"])
                for name, s in benches.items()]

    monkeypatch.setattr(run_all, "BENCHMARKS", {"replay": replay})
    out = tmp_path / "run.json"
    with pytest.raises(SystemExit, match="FAILED .*plot weight_sync: KeyError: 'raw_s'") as exit_:
        run_all.main(["--quick", "--out", str(out)])
    assert exit_.value.code != 0
    assert json.loads(out.read_text())["benchmarks"].keys() == benches.keys()
    written = sorted(p.stem for p in (tmp_path / "run").glob("*.png"))
    assert written == sorted({*PLOTS, "targets"} - {"weight_sync"})


def test_run_all_goes_on_past_a_failing_benchmark_and_exits_naming_it(tmp_path, monkeypatch):
    """A benchmark that raises is reported and the next one still runs; the JSON holds what finished."""
    from benchmarks import run_all

    ran = []

    def broken(quick: bool) -> list[Section]:
        ran.append("broken")
        raise RuntimeError("engine did not start")

    def fine(quick: bool) -> list[Section]:
        ran.append("fine")
        return [Section("fine", {}, [Figure("x", 2.0, "u", "ref", 1.0)], [], 0.0)]

    monkeypatch.setattr(run_all, "BENCHMARKS", {"broken": broken, "fine": fine})
    out = tmp_path / "run.json"
    with pytest.raises(SystemExit, match="FAILED .*benchmark broken: RuntimeError: engine did not start"):
        run_all.main(["--quick", "--out", str(out)])
    assert ran == ["broken", "fine"]
    assert list(json.loads(out.read_text())["benchmarks"]) == ["fine"]
