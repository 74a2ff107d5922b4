"""benchmarks/limits.py's arithmetic against hand-worked numbers, and the machine measurements it
divides by (rlsys.observe.hardware) on what they count. No Ray, seconds."""

import torch

from benchmarks.learner import synthetic_batch
from benchmarks.limits import classify, decode_bounds, decode_step, parts_of, scaled, update_flops
from rlsys.config import AlgoConfig, LearnerConfig
from rlsys.math.flops import Shape, forward_flops
from rlsys.math.packing import cut
from rlsys.observe import hardware
from rlsys.observe.hardware import linear_shapes, memory_bandwidth, model_matmul_rate

SMOLLM2 = Shape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152)


def test_the_linear_shapes_are_every_matmul_weight_once():
    for shape in (SMOLLM2, Shape(64, 2, 4, 2, 16, 128, 108), Shape(8, 3, 2, 2, 4, 16, 10, gated_mlp=False)):
        assert sum(k * n * count for k, n, count in linear_shapes(shape)) == shape.matmul_params


def test_model_matmul_rate_counts_forward_and_both_backward_products():
    shape = Shape(32, 2, 2, 1, 16, 64, 50)
    fwd = model_matmul_rate(shape, tokens=16, dtype="float32", backward=False, seconds=0.001, repeats=1)
    both = model_matmul_rate(shape, tokens=16, dtype="float32", backward=True, head_tokens=4, seconds=0.001,
                             repeats=1)
    head = 2 * 32 * 50
    assert fwd["flops"] == 2 * 16 * shape.matmul_params
    assert both["flops"] == 3 * (2 * 16 * (shape.matmul_params - 32 * 50) + 4 * head)
    assert fwd["flops_per_s"] > 0 and both["flops_per_s"] > 0


def test_memory_bandwidth_counts_a_copy_as_read_and_write(monkeypatch):
    clock = iter(range(1000))
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: float(next(clock)))  # every timed call takes 1 s
    bw = memory_bandwidth(nbytes=1 << 20, repeats=2)
    assert bw["read"] == 1 << 20 and bw["copy"] == 2 << 20


def test_ops_go_to_their_parts_and_the_rest_is_outside_ops():
    ops = {"aten::mm": 3.0, "aten::addmm": 1.0, "_C::cpu_attention_with_kv_cache": 1.0, "aten::_log_softmax": 0.5,
           "aten::_fused_adamw_": 0.5, "aten::_to_copy": 0.25, "aten::silu": 0.25, "record_param_comms": 0.5}
    parts = parts_of(ops, wall=10.0)
    assert parts["matmul"] == 4.0 and parts["attention"] == 1.0 and parts["softmax and log-probs"] == 0.5
    assert parts["optimizer"] == 0.5 and parts["copies and casts"] == 0.25
    assert parts["other ops"] == 0.75 and parts["outside ops"] == 3.0
    assert sum(parts.values()) == 10.0
    assert classify("gloo:broadcast") == "communication" and classify("_C::fused_gumbel_argmax") == "sampling"
    # shares kept, seconds rescaled to the unprofiled time; empty parts dropped
    assert scaled({"matmul": 3.0, "attention": 1.0, "sampling": 0.0}, 2.0) == {"matmul": 1.5, "attention": 0.5}


def test_update_flops_picks_the_layout_the_learner_picks():
    """The FLOPs divided by are those of the plan rlsys.math.packing.cut keeps, whatever it is."""
    algo, cfg = AlgoConfig(group_size=4), LearnerConfig(mini_batch_size=8, max_tokens_per_micro_batch=256)
    for prompt_len, response_len in ((100, 8), (4, 60)):
        step = {"prompts": 2, "group": 4, "prompt_len": prompt_len, "response_len": response_len}
        batch = synthetic_batch(2, 4, prompt_len, response_len, 50, algo)
        shard = cut(batch, 0, 1, cfg, algo, seed=0, step=0, shape=SMOLLM2)
        got = update_flops(SMOLLM2, step, budget=256)
        assert got["layout"] == ("shared" if shard.shared else "rows"), (prompt_len, response_len)
        flat_body = 8 * (forward_flops(SMOLLM2, prompt_len + response_len, response_len)
                         - 2 * SMOLLM2.hidden * SMOLLM2.vocab * response_len)
        if got["layout"] == "shared":
            assert got["body"] < flat_body  # the prompt once per group instead of once per row
        assert got["flops"] == 3 * (got["body"] + 2 * SMOLLM2.hidden * SMOLLM2.vocab * 8 * response_len)


def test_decode_bounds_by_hand():
    # SmolLM2 at batch 32, 300 tokens of context, fp32, 20 GB/s, 100 GFLOP/s:
    # 134,479,872 weights x 4 B = 537.9 MB -> 26.9 ms; FLOPs 32 x (2 x 134.48M + 30 x 4 x 9 x 64 x 300)
    # = 32 x (268.96M + 20.736M) = 9.270 GFLOP -> 92.7 ms: compute binds.
    b = decode_bounds(SMOLLM2, batch=32, context=300, dtype_bytes=4, read_bw=20e9, peak=100e9)
    assert b["bytes"] == 537_919_488
    assert b["flops"] == 32 * (2 * 134_479_872 + 30 * 4 * 9 * 64 * 300)
    assert abs(b["bandwidth_s"] - 0.0268960) < 1e-6 and abs(b["compute_s"] - 0.0927021) < 1e-6
    assert b["binding"] == "compute" and b["limit_s"] == b["compute_s"]
    # bf16 at 1 GB/s: streaming binds
    assert decode_bounds(SMOLLM2, 32, 300, 2, 1e9, 100e9)["binding"] == "bandwidth"
    assert decode_step(5.0, 15.0, (16, 64)) == 10.0 / 48


def test_synthetic_batch_has_the_step_shape():
    batch = synthetic_batch(4, 8, 200, 64, 1000, AlgoConfig(group_size=8))
    assert tuple(batch.input_ids.shape) == (32, 264) and int(batch.attention_mask.sum()) == 32 * 264
    assert torch.equal(batch.prompt_lens, torch.full((32,), 200))
