"""The benchmark code itself: FLOP counting against torch's own counter and hand-worked numbers,
the ratio and target arithmetic, the result schema, the timeline's busy shares, and two real
benchmarks (weight sync, learner) on tiny settings."""

import json
import threading
import math

import pytest
import torch

from benchmarks.common import Figure, Section, check_result, ratio, write_result
from rlsys.math.flops import Shape, forward_flops, grpo_step_flops, mfu
from rlsys.observe.profile import Spans, Timeline, busy_split, read_tracks

TINY = Shape(hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)


def test_flops_by_hand():
    # q 4x4 + k, v 4x2 each + o 4x4 = 48; gated MLP 3 x 4 x 8 = 96; lm_head 4 x 10 = 40
    assert TINY.matmul_params == 48 + 96 + 40
    # dense 2 x 184 x 3 = 1104; attention 1 layer x 4 x 2 heads x 2 dims x (1 + 2 + 3) = 96
    assert forward_flops(TINY, 3) == 1104 + 96
    # old log-probs (1 forward) + forward and backward (3 forwards) per epoch, two sequences
    assert grpo_step_flops(TINY, [3, 3]) == 4 * 2 * 1200
    assert grpo_step_flops(TINY, [3], epochs=2, reference=True) == (1 + 1 + 6) * 1200
    assert mfu(1e12, 2.0, 1e12) == 0.5
    # the output layer (4 x 10) at 1 of the 3 positions: 2 x 40 x 2 fewer FLOPs; no old-log-prob pass
    assert forward_flops(TINY, 3, logits=1) == 1200 - 160
    assert grpo_step_flops(TINY, [3], response_lens=[1], old_logprob_pass=False) == 3 * 1040


def _qwen2(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=100):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def test_matmul_params_are_the_models_linear_weights():
    model = _qwen2()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert Shape.of(model.config).matmul_params == linear


def test_forward_flops_agree_with_torchs_flop_counter():
    """torch counts the eager attention's full S x S products; rlsys counts the causal half the
    model needs. At one token both are the same; at S tokens they differ by exactly that."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _qwen2()
    shape = Shape.of(model.config)

    def counted(seq: int) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(input_ids=torch.zeros(1, seq, dtype=torch.long))
        return counter.get_total_flops()

    assert forward_flops(shape, 1) == counted(1)
    S = 12
    full_minus_causal = shape.layers * 4 * shape.heads * shape.head_dim * (S * S - S * (S + 1) // 2)
    assert forward_flops(shape, S) == counted(S) - full_minus_causal


def test_ratios_read_higher_is_better_and_targets_report_the_shortfall():
    assert ratio(300.0, 100.0) == 3.0
    assert ratio(2.0, 1.0, lower_is_better=True) == 0.5  # twice the reference's time: half as good
    with pytest.raises(ValueError, match="positive"):
        ratio(0.0, 1.0)
    missed = Figure("sync", 0.5, "s", "raw", 0.2, lower_is_better=True, target=0.8).to_json()
    assert missed["ratio"] == pytest.approx(0.4)
    assert missed["target"] == {"min_ratio": 0.8, "met": False, "shortfall": pytest.approx(0.5)}
    met = Figure("gen", 300.0, "tokens/s", "hf", 100.0, target=1.5).to_json()
    assert met["target"]["met"] and met["target"]["shortfall"] == 0.0
    assert Figure("x", 1.0, "u", "r", 1.0).to_json()["target"] is None


def test_repeats_are_taken_interleaved_and_a_target_is_met_only_by_the_lowest_ratio(tmp_path):
    from benchmarks.common import interleaved

    order, ours, refs = [], iter([2.0, 2.4, 1.9]), iter([1.0, 1.0, 1.25])
    a, b = interleaved(lambda: order.append("ours") or next(ours), lambda: order.append("ref") or next(refs), 3)
    assert order == ["ours", "ref"] * 3 and a == [2.0, 2.4, 1.9] and b == [1.0, 1.0, 1.25]
    # pairwise speed ratios 2.0, 2.4, 1.52: median 2.0, lowest 1.52
    fig = Figure.repeated("gen", a, "tokens/s", "hf", b, target=1.6)
    assert fig.value == 2.0 and fig.reference_value == 1.0
    assert fig.ratio == pytest.approx(2.0) and fig.ratio_range == pytest.approx((1.52, 2.4))
    j = fig.to_json()
    assert j["repeats"] == 3 and j["samples"] == a and j["reference_samples"] == b
    assert j["target"] == {"min_ratio": 1.6, "met": False, "shortfall": pytest.approx(1 - 1.52 / 1.6)}
    assert Figure.repeated("gen", a, "tokens/s", "hf", b, target=1.5).to_json()["target"]["met"]
    times = Figure.repeated("sync", [0.5, 0.4], "s", "raw", [0.2, 0.2], lower_is_better=True)
    assert times.ratios == pytest.approx([0.4, 0.5]) and times.ratio == pytest.approx(0.45)
    assert "(1.52-2.40, 3 repeats)" in Section("s", {}, [fig]).table()
    with pytest.raises(ValueError, match="pairs"):
        Figure.repeated("gen", [1.0, 2.0], "u", "r", [1.0])
    # the schema recomputes the median and the lowest ratio from the samples
    result = json.loads(write_result([Section("s", {}, [fig], [], 1.0)], tmp_path / "r.json", quick=True).read_text())
    result["benchmarks"]["s"]["figures"][0]["target"]["met"] = True
    with pytest.raises(ValueError, match="lowest ratio"):
        check_result(result)


def test_result_schema_is_checked_on_write(tmp_path):
    section = Section("demo", {"size": 1}, [Figure("a", 2.0, "u", "ref", 1.0, target=1.5)], [{"row": 1}], 1.0)
    out = write_result([section], tmp_path / "r.json", quick=True)
    result = json.loads(out.read_text())
    check_result(result)
    assert result["benchmarks"]["demo"]["figures"][0]["ratio"] == 2.0
    result["benchmarks"]["demo"]["figures"][0]["ratio"] = 3.0
    with pytest.raises(ValueError, match="does not follow"):
        check_result(result)
    result["benchmarks"]["demo"]["figures"][0]["reference"] = {"name": "ref"}
    with pytest.raises(ValueError, match="reference"):
        check_result(result)
    with pytest.raises(ValueError, match="no figures"):
        write_result([Section("empty", {})], tmp_path / "e.json", quick=True)


def test_busy_split_by_hand(tmp_path):
    """Two 10 ms steps; a generator busy 6 ms in the first (4 of them generating), a learner busy
    for 5 ms in the second, plus 5 ms outside any step (not counted)."""
    spans = lambda *items: [{"name": n, "ts": ts, "dur": d, "args": {}} for n, ts, d in items]  # noqa: E731
    timeline = Timeline()
    timeline.add("driver", spans(("step", 0, 10_000), ("step", 10_000, 10_000)))
    timeline.add("generator 0", spans(("generate", 0, 4_000), ("receive_weights", 8_000, 2_000)))
    timeline.add("learner 0", spans(("train", 12_000, 5_000), ("train", 30_000, 5_000)))
    # a threaded actor: two runs at once, 2-6 ms and 4-8 ms, busy 6 ms (their union), not 8
    timeline.add("sandbox 0", spans(("run", 2_000, 4_000), ("run", 4_000, 4_000)))
    path = timeline.write(tmp_path / "timeline.json")
    trace = json.loads(path.read_text())
    assert {e["ph"] for e in trace["traceEvents"]} == {"M", "X"}
    tracks = read_tracks(path)
    split = busy_split(tracks)
    assert split["generator"] == pytest.approx({"generate": 0.2, "receive_weights": 0.1, "idle": 0.7})
    assert split["learner"] == pytest.approx({"train": 0.25, "idle": 0.75})
    assert split["sandbox"] == pytest.approx({"run": 0.3, "idle": 0.7})
    assert list(split["generator"])[-1] == "idle"
    assert busy_split(tracks, skip_steps=1)["generator"] == {"idle": 1.0}


def test_spans_time_what_they_wrap():
    spans = Spans()
    with spans.span("work", step=3):
        sum(range(10_000))
    (span,) = spans.take()
    assert span["name"] == "work" and span["args"] == {"step": 3} and span["dur"] >= 0
    assert span["tid"] == threading.get_native_id()
    assert spans.take() == []
    off = Spans(enabled=False)  # a run without profiling keeps nothing
    with off.span("work"):
        pass
    assert off.take() == []


def test_weight_sync_benchmark_on_a_1m_model(ray_cluster):
    from benchmarks.common import tiny_model
    from benchmarks.weight_sync import measure

    path, params = tiny_model(128, 6, 4)
    assert 0.8e6 < params < 1.2e6
    m = measure(path, repeats=1, bucket_mb=1.0)
    assert m["bytes"] == 4 * params and m["buckets"] > 1 and m["generators"] == 2
    assert 0 < m["engine_load_s"] < m["rlsys_s"] and m["raw_s"] > 0


def test_learner_benchmark_counts_tokens_and_flops(ray_cluster):
    from benchmarks.common import tiny_model
    from benchmarks.learner import measure
    from transformers import AutoConfig

    path, _ = tiny_model(64, 2, 2)
    shape = {"prompts": 2, "group": 8, "prompt_len": 8, "response_len": 8}
    m = measure(path, 0, "float32", shape, repeats=1)
    assert m["tokens"] == 2 * 8 * 16
    assert m["flops"] == 3 * 16 * forward_flops(Shape.of(AutoConfig.from_pretrained(path)), 16, logits=8)
    assert math.isclose(m["tokens_per_s"], m["tokens"] / m["seconds"])


def test_a_bad_hardware_file_names_the_key(tmp_path, monkeypatch):
    from benchmarks.common import hardware

    assert hardware()["peak_tflops"]["float32"] > 0  # the shipped file is valid
    bad = tmp_path / "hw.yaml"
    bad.write_text("peak_tflops:\n  float32: 0.3\nlinks:\n  nvlink_gb_per_s: 450\n")
    monkeypatch.setenv("RLSYS_HARDWARE", str(bad))
    with pytest.raises(ValueError, match=r"hw.yaml: peak_tflops.bfloat16 must be a positive number"):
        hardware()


def test_scaling_figures_by_hand():
    """Three steps of a run (the first skipped as warm-up); then the engine sweep's figures:
    ideal linear = N x the 1-engine run's tokens/s, speed-up against that run, times inverted."""
    from benchmarks.scaling import engine_figures, ideal_line, measure, split_figures

    def step(gen, tokens):
        return {"timing/generate": gen, "timing/reward": 0.5, "timing/learn": 1.0, "timing/sync": 0.5,
                "tokens/total": tokens}

    one = measure([step(9.0, 1), step(1.0, 300), step(2.0, 500)])  # steps of 3 s and 4 s, 800 tokens
    assert one["steps_measured"] == 2 and one["step_s"] == [3.0, 4.0]
    assert one["tokens_per_s"] == pytest.approx(800 / 7) and one["generate_s_mean"] == 1.5
    two = measure([step(9.0, 1), step(1.0, 500), step(1.0, 500)])  # 1000 tokens in 6 s
    assert ideal_line(100.0, [1, 2, 4]) == [100.0, 200.0, 400.0]
    figs = {f.name: f for f in engine_figures({1: one, 2: two}, 2, 2, "cpu")}
    ideal = figs["2 engines: tokens/s vs ideal linear"]
    assert ideal.reference_value == pytest.approx(1600 / 7)
    assert ideal.ratio == pytest.approx((1000 / 6) / (1600 / 7))  # scaling efficiency, 0.73
    assert figs["2 engines: tokens/s vs 1 engine"].ratio == pytest.approx((1000 / 6) / (800 / 7))
    assert figs["2 engines: generate phase"].ratio == 1.5 and figs["2 engines: step time"].ratio == 3.5 / 3.0
    assert "all actors share them" in ideal.note  # 4.5 logical CPUs asked of 2 cores
    # Amdahl from the 1-engine run: a 3.5 s step of which 1.5 s generate, 3.5 / 2.0
    assert "at most 1.75x" in figs["2 engines: tokens/s vs 1 engine"].note
    (split,) = split_figures({3: [(1, 2), (2, 1)]}, {(1, 2): one, (2, 1): two}, 8, "cpu")
    assert split.ratio == pytest.approx((1000 / 6) / (800 / 7)) and "no core shared" in split.note
    with pytest.raises(ValueError, match="1-engine run"):
        engine_figures({2: two}, 2, 2, "cpu")


def test_link_rates_and_the_link_limit_by_hand(tmp_path):
    """--link: rates in Mb/s; the limit is the payload's bits over the rate; a script's own option
    reaches its run; the shaped-link figures read limit / wire (the issue's >= 0.8)."""
    import argparse

    from benchmarks.common import link_label, link_limit_s, main, parse_links
    from benchmarks.weight_sync import link_rows_figures

    assert parse_links("10000, 1000") == [10000.0, 1000.0]
    for bad in ("", "0", "1000,-5", "1G"):
        with pytest.raises(argparse.ArgumentTypeError, match="--link"):
            parse_links(bad)
    from benchmarks.common import tiny_model
    from benchmarks.weight_sync import model_params_of

    assert model_params_of(64, 2, 2) == tiny_model(64, 2, 2)[1]  # the shape arithmetic the memory wait uses
    assert link_limit_s(125_000_000, 1000) == 1.0  # 1 Gbit at 1 Gb/s
    assert link_limit_s(378_540_032, 1000) == pytest.approx(3.028, abs=1e-3)  # the 95M model, fp32
    assert [link_label(r) for r in (None, 10000, 1000, 100)] == ["unshaped", "10 Gb/s", "1 Gb/s", "100 Mb/s"]
    rows = [{"size": "95M", "bytes": 125_000_000, "rate_mbit": None, "wire_s": 0.5, "raw_s": 0.25},
            {"size": "95M", "bytes": 125_000_000, "rate_mbit": 1000, "wire_s": 1.25, "raw_s": 1.1, "limit_s": 1.0}]
    unshaped, wire, raw = link_rows_figures(rows)
    assert unshaped.ratio == 0.5 and unshaped.target == 0.8
    assert wire.ratio == pytest.approx(0.8) and wire.to_json()["target"]["met"] and wire.reference_value == 1.0
    assert raw.ratio == pytest.approx(1 / 1.1) and raw.target is None
    # with the row's repeats: wire against raw pairs repeat i of each; against the limit, each repeat
    rows[0] |= {"wire_all_s": [0.5, 0.4], "raw_all_s": [0.25, 0.4]}
    rows[1] |= {"wire_all_s": [1.25, 1.2, 1.3], "raw_all_s": [1.1, 1.1, 1.1]}
    unshaped, wire, raw = link_rows_figures(rows)
    assert unshaped.ratios == pytest.approx([0.5, 1.0]) and not unshaped.to_json()["target"]["met"]
    assert wire.ratios == pytest.approx([0.8, 1 / 1.2, 1 / 1.3]) and not wire.to_json()["target"]["met"]
    assert wire.reference_samples == [1.0] * 3 and raw.samples == [1.1] * 3
    got = []
    section = Section("demo", {}, [Figure("a", 2.0, "u", "ref", 1.0)], [{"row": 1}])
    main(lambda quick: section, ["--link", "1000", "--out", str(tmp_path / "r.json")],
         options={"--link": dict(type=parse_links, default=None)},
         run_with=lambda quick, link: got.append(link) or section)
    assert got == [[1000.0]] and (tmp_path / "r.json").is_file()


def test_scaling_link_figures_by_hand():
    from benchmarks.scaling import link_figures, measure

    def run(gen, sync, tokens):
        step = {"timing/generate": gen, "timing/reward": 0.5, "timing/learn": 1.0, "timing/sync": sync,
                "tokens/total": tokens}
        return measure([step, step])  # the first is the warm-up

    by = {(None, 1): run(2.0, 0.5, 400), (None, 2): run(1.5, 0.5, 400), (1000, 1): run(2.0, 1.5, 400)}
    figs = {f.name: f for f in link_figures(by, "note")}
    assert set(figs) == {"1 engine(s) at 1 Gb/s: tokens/s vs unshaped", "1 engine(s) at 1 Gb/s: sync phase vs unshaped",
                         "2 engines at unshaped: tokens/s vs 1 engine"}
    assert figs["1 engine(s) at 1 Gb/s: tokens/s vs unshaped"].ratio == pytest.approx(4.0 / 5.0)  # 4 s vs 5 s steps
    assert figs["1 engine(s) at 1 Gb/s: sync phase vs unshaped"].ratio == pytest.approx(0.5 / 1.5)
    assert figs["2 engines at unshaped: tokens/s vs 1 engine"].ratio == pytest.approx(4.0 / 3.5)



def test_overlap_figures_by_hand(tmp_path):
    """overlap: synchronous and asynchronous runs taken in turn; the tokens/s figure pairs run i of
    each, judges the 1.4 target by the lowest pair; the reward figure is the mean over the runs."""
    from benchmarks.overlap import TARGET, overlap_figures, overlap_row

    def run(rate, rewards):
        return {"steps": 5, "tokens_per_s": rate, "reward": rewards, "elapsed_s": [1.0 * i for i in range(5)],
                "phases_s_mean": {"wait": 0.0, "generate": 0.1, "learn": 0.2}}

    sync = [run(100, [0.1, 0.2, 0.3, 0.4, 0.5]), run(80, [0.1, 0.2, 0.3, 0.4, 0.7])]
    async_ = [run(150, [0.1, 0.2, 0.3, 0.4, 0.6]), run(120, [0.1, 0.2, 0.3, 0.4, 0.6])]
    row = overlap_row("toy", sync, async_, tmp_path, "pinned")
    assert row["tokens_per_s"] == {"synchronous": [100, 80], "asynchronous": [150, 120]}
    assert (tmp_path / "reward_toy.png").is_file()
    speed, reward = overlap_figures("toy", sync, async_, "pinned", row["plot"])
    assert speed.ratios == pytest.approx([1.5, 1.5]) and speed.target == TARGET
    assert speed.to_json()["target"]["met"]
    assert reward.value == pytest.approx(0.6) and reward.reference_value == pytest.approx(0.6)  # last step, mean
    slow = [run(160, sync[0]["reward"]), run(100, sync[0]["reward"])]  # 1.6 and 1.25: median meets, lowest not
    speed, _ = overlap_figures("toy", sync, slow, "pinned", row["plot"])
    assert speed.ratio == pytest.approx(1.425) and not speed.to_json()["target"]["met"]
    shared, _ = overlap_figures("toy", sync, slow, "shared", row["plot"])
    assert shared.target is None and "shared cores" in shared.name



def test_scaling_figures_over_rounds_by_hand():
    """Every setting run round after round: a figure pairs round i of each side; rows keep the
    medians under a single run's keys and every run beside; a link round that failed is left out."""
    from benchmarks.scaling import engine_figures, link_figures, measure, setting_row, split_figures

    def run(gen, sync, tokens, **extra):
        step = {"timing/generate": gen, "timing/reward": 0.5, "timing/learn": 1.0, "timing/sync": sync,
                "tokens/total": tokens}
        return {**measure([step, step]), **extra}

    one = [run(2.0, 0.5, 400), run(2.5, 0.5, 400)]  # 4 s and 4.5 s steps: 100, 88.9 tokens/s
    two = [run(1.0, 0.5, 400), run(2.0, 0.5, 400)]  # 3 s and 4 s: 133.3, 100 tokens/s
    figs = {f.name: f for f in engine_figures({1: one, 2: two}, 2, 2, "cpu")}
    speed = figs["2 engines: tokens/s vs 1 engine"]
    assert speed.samples == pytest.approx([400 / 3, 100]) and speed.reference_samples == pytest.approx([100, 400 / 4.5])
    assert speed.ratios == pytest.approx([4 / 3, 4.5 / 4])
    ideal = figs["2 engines: tokens/s vs ideal linear"]
    assert ideal.reference_samples == pytest.approx([200, 800 / 4.5]) and ideal.ratio_range[0] == pytest.approx(4.5 / 8)
    assert figs["2 engines: step time"].ratios == pytest.approx([4 / 3, 4.5 / 4])
    (split,) = split_figures({3: [(1, 2), (2, 1)]}, {(1, 2): one, (2, 1): two}, 8, "cpu")
    assert split.ratios == speed.ratios
    with pytest.raises(ValueError, match="runs against"):
        engine_figures({1: one, 2: two[:1]}, 2, 2, "cpu")
    row = setting_row([{**r, "engines": 2, "ranks": 2} for r in two])
    assert row["engines"] == 2 and row["tokens_per_s"] == pytest.approx((400 / 3 + 100) / 2)
    assert row["tokens_per_s_repeats"] == pytest.approx([400 / 3, 100]) and len(row["repeats"]) == 2
    assert row["phases_s_mean"]["generate"] == 1.5 and row["generate_s_mean"] == 1.5
    # links: the 1 Gb/s setting's second round failed; its figures pair the one round it has
    by = {(None, 1): [run(2.0, 0.5, 400), run(2.0, 0.5, 400)], (1000, 1): [run(2.0, 1.5, 400)]}
    figs = {f.name: f for f in link_figures(by, "note")}
    assert figs["1 engine(s) at 1 Gb/s: tokens/s vs unshaped"].ratios == pytest.approx([4.0 / 5.0])
    assert figs["1 engine(s) at 1 Gb/s: sync phase vs unshaped"].samples == [1.5]



def test_peer_figures_by_hand():
    """end_to_end: rlsys and TRL runs taken in turn, each run's tokens/s one sample; the SmolLM2
    target (3.0) is met only when the LOWEST pairwise ratio meets it; the note names the CPU."""
    from benchmarks.end_to_end import TARGETS_VS_TRL, mean_shares, peer_figures

    assert TARGETS_VS_TRL == {"tiny": 2.0, "smollm2-gsm8k": 3.0, "smollm2-gsm8k-bf16": 3.0}

    def ours(rate, step):
        return {"tokens_per_s": rate, "step_s_mean": step, "split": {"generate": 0.3, "learn": 0.6},
                "groups": {"generator": {"generate": 0.2 + step / 100, "idle": 0.8 - step / 100}},
                "rows_computed": [0.5, 0.75]}

    def trl(rate, step, gen=60.0):
        return {"tokens_per_s": rate, "step_s_mean": step, "generate_s_mean": gen, "trl_version": "0.x",
                "generation": "generate"}

    # pairwise ratios 2.9 and 3.2: median 3.05 meets 3.0, the lowest does not
    figs, bound = peer_figures("smollm2-gsm8k", [ours(290, 30), ours(320, 28)], [trl(100, 90), trl(100, 84)],
                               "Test CPU 9000")
    speed, step = figs
    assert speed.ratios == pytest.approx([2.9, 3.2]) and speed.ratio == pytest.approx(3.05)
    j = speed.to_json()
    assert j["samples"] == [290, 320] and j["reference_samples"] == [100, 100] and j["repeats"] == 2
    assert j["target"]["min_ratio"] == 3.0 and not j["target"]["met"]
    assert j["target"]["shortfall"] == pytest.approx(1 - 2.9 / 3.0)
    assert "Test CPU 9000" in speed.note and "Test CPU 9000" in step.note
    assert "computed 62% of the rows" in speed.note  # the mean share over both runs' steps
    assert step.lower_is_better and step.ratios == pytest.approx([3.0, 3.0])
    assert bound == pytest.approx(87 / (87 - 60))  # TRL's median step and generation
    met, _ = peer_figures("smollm2-gsm8k-bf16", [ours(305, 30), ours(330, 28)], [trl(100, 90), trl(100, 84)], "cpu")
    assert met[0].to_json()["target"]["met"]
    tiny, _ = peer_figures("tiny", [ours(250, 1), ours(260, 1)], [trl(100, 2, 1), trl(110, 2, 1)], "cpu")
    assert tiny[0].target == 2.0 and tiny[0].to_json()["target"]["met"]  # lowest 260/110 = 2.36
    shares = mean_shares([ours(1, 10), ours(1, 30)])
    assert shares == {"generator": pytest.approx({"generate": 0.4, "idle": 0.6})}



def test_learner_sweep_alternates_each_setting_with_the_reference(monkeypatch):
    """learner: the reference group stays up; each setting's updates alternate with the reference's,
    every update followed by a roofline of its precision; the reference's row gathers every pair."""
    import benchmarks.learner as learner

    calls = []

    class Fake:
        def __init__(self, path, zero, dtype, shape):
            self.zero, self.dtype, self.tokens, self.flops, self.seconds = zero, dtype, 100, 1e9, []
            calls.append(("up", zero, dtype))

        def update(self):
            calls.append(("update", self.zero, self.dtype))
            self.seconds.append(1.0 + len(calls) / 100)
            return self.tokens / self.seconds[-1]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            calls.append(("down", self.zero, self.dtype))

    monkeypatch.setattr(learner, "Live", Fake)
    roofs = []
    out = learner.paired_sweep({"m": "path"}, [(0, "float32"), (1, "bfloat16"), (3, "float32")], {}, 2,
                               lambda dtype: roofs.append(dtype) or 2e12)
    updates = [c[1:] for c in calls if c[0] == "update"]
    assert updates == [(1, "bfloat16"), (0, "float32")] * 2 + [(3, "float32"), (0, "float32")] * 2
    assert roofs == ["bfloat16", "float32"] * 2 + ["float32"] * 4
    assert calls[0] == ("up", 0, "float32") and calls[-1] == ("down", 0, "float32")  # the reference outlives them
    assert [(m["live"].zero, m["base"]) for m in out] == [(0, True), (1, False), (3, False)]
    base, zero1, _ = out
    assert len(base["seconds"]) == len(base["roofline"]) == 4 and base["base_seconds"] == base["seconds"]
    assert len(zero1["seconds"]) == len(zero1["base_seconds"]) == len(zero1["roofline"]) == 2
    assert zero1["base_seconds"] == base["seconds"][:2]  # the reference's updates of the same pairs



def test_rollout_sides_alternate_in_fresh_processes(monkeypatch):
    """rollout: vLLM and HF each a fresh process per sample, taken vLLM, HF, vLLM, HF; the 1.5
    target judged by the lowest pairwise speed ratio; the row keeps the medians and every sample."""
    import benchmarks.rollout as rollout

    order, seconds = [], iter([1.0, 2.0, 1.0, 1.4])  # vLLM 1.0 s, HF 2.0 s; then 1.0 s, 1.4 s
    monkeypatch.setattr(rollout, "in_fresh_process", lambda fn, *a: order.append(fn.__name__) or next(seconds))
    monkeypatch.setattr(rollout, "generate_flops", lambda *a: 10**9)
    section = Section("rollout", {})
    rollout.vllm_vs_hf(section, "m", "path", ["a", "b"], n=4, tokens=8, repeats=2, roofline=1e10)
    assert order == ["vllm_side", "hf_side"] * 2
    speed, flops = section.figures
    assert speed.ratios == pytest.approx([2.0, 1.4]) and speed.ratio == pytest.approx(1.7)
    assert speed.target == 1.5 and not speed.to_json()["target"]["met"]
    assert speed.samples == pytest.approx([64.0, 64.0])  # 2 prompts x 4 x 8 tokens in 1 s
    assert flops.ratios == pytest.approx([0.1, 0.1])  # 1 GFLOP in 1 s of a 10 GFLOP/s roofline
    (row,) = section.rows
    assert row["vllm_s_repeats"] == [1.0, 1.0] and row["hf_s_repeats"] == [2.0, 1.4] and row["hf_s"] == 1.7
