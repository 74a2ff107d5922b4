import json

import pytest

from rlsys.observe.report import report, summarize


def rows(rewards):
    return [{"step": i, "reward/mean": r, "reward/accuracy": r, "reward/format": 0.0, "timing/generate": 1.0,
             "timing/reward": 0.5, "timing/learn": 2.0, "timing/sync": 0.5, "throughput/tokens_per_s": 100.0,
             "response_length/mean": 10.0 + i, "response_length/max": 16, "truncated_frac": 0.25}
            for i, r in enumerate(rewards)]


def test_summary_figures_by_hand():
    s = summarize(rows([0.0, 0.1, 0.2, 0.9, 1.0, 0.8]), window=2)
    assert s["reward_first"] == pytest.approx(0.05) and s["reward_last"] == pytest.approx(0.9)
    assert s["loop_s"] == pytest.approx(6 * 4.0) and s["step_s"] == pytest.approx(4.0) and s["overlap_s"] == 0.0
    assert s["split"] == pytest.approx({"generate": 0.25, "reward": 0.125, "learn": 0.5, "sync": 0.125})


def test_an_asynchronous_run_reports_wall_time_and_the_overlap_not_the_sum_of_its_phases(tmp_path):
    """Phases of 4 s a step that overlapped into 2.5 s of wall time each (timing/step, as the
    asynchronous loop records it): the loop is 3 x 2.5 s, the overlap 3 x 1.5 s."""
    overlapped = [r | {"timing/step": 2.5} for r in rows([0.1, 0.5, 0.9])]
    s = summarize(overlapped)
    assert s["loop_s"] == pytest.approx(7.5) and s["step_s"] == pytest.approx(2.5)
    assert s["overlap_s"] == pytest.approx(4.5)
    assert s["split"] == pytest.approx({"generate": 0.25, "reward": 0.125, "learn": 0.5, "sync": 0.125})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in overlapped))
    assert "3 steps, loop 7.5s wall, 2.50s a step (median)" in report(tmp_path)
    assert "the phases overlapped 4.5s (asynchronous)" in report(tmp_path)


def test_report_writes_plots_and_names_a_missing_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows([0.1, 0.5, 0.9])))
    text = report(tmp_path)
    # 3 steps: a window of 1 at each end (the middle step is in neither)
    assert "reward/mean  first 1 steps 0.100 -> last 1 0.900" in text
    assert "accuracy     first 1 steps 0.100 -> last 1 0.900" in text
    assert (tmp_path / "reward.png").stat().st_size > 1000 and (tmp_path / "timing.png").is_file()
    assert (tmp_path / "lengths.png").stat().st_size > 1000 and (tmp_path / "signatures.png").stat().st_size > 1000
    assert "actors" not in text  # no timeline.json: not a profiled run
    assert "tools.png" not in text and not (tmp_path / "tools.png").exists()  # no generator.tools
    assert "samples" not in text and not (tmp_path / "samples.md").exists()  # no samples.jsonl
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(
        {"step": i, "prompt": "...", "question": f"{i} + 1 =", "completion": f"<think> t </think> {i + 1}",
         "answer": str(i + 1), "reward": 1.0}) + "\n" for i in range(3)))
    assert f"samples      {tmp_path / 'samples.md'}" in report(tmp_path)
    table = (tmp_path / "samples.md").read_text().splitlines()
    assert [line.split(" | ")[1] for line in table[2:]] == ["0 + 1 =", "1 + 1 =", "2 + 1 ="]  # first, middle, last
    with pytest.raises(FileNotFoundError, match="no metrics"):
        report(tmp_path / "nope")


def test_a_run_with_tools_gets_its_tool_use_plot(tmp_path):
    tools = [r | {"tools/used_frac": 0.25 * i, "tools/errors_mean": 0.0} for i, r in enumerate(rows([0.1, 0.5, 0.9]))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tools))
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "step_0.json").write_text(json.dumps({"pass@1": 0.2, "cons@4": 0.3, "k": 4, "format": 0.1,
                                                                 "tools/used_frac": 0.5}))
    assert str(tmp_path / "tools.png") in report(tmp_path)
    assert (tmp_path / "tools.png").stat().st_size > 1000


def test_sparkline_maps_zero_to_one_onto_eight_blocks():
    from rlsys.observe.metrics import sparkline

    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([-1.0, 2.0]) == "▁█"  # out of range: clamped, never an IndexError


def test_reflection_share_counts_whole_words_in_any_case():
    import doctest

    from rlsys.observe import metrics

    assert doctest.testmod(metrics).failed == 0  # reflection_share
    texts = ["WAIT. 12 + 30 = 42", "Let me verify: 42", "42", "again and again", "waiting", "verify? check!"]
    assert metrics.reflection_share(texts, ["wait", "check", "verify", "again"]) == pytest.approx(4 / 6)
    assert metrics.reflection_share(texts, []) == 0.0


def test_report_doctests():
    import doctest

    from rlsys.observe import report as module

    assert doctest.testmod(module).failed == 0  # sample_table
