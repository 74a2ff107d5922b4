"""A local run that cannot fit this machine's memory stops before any actor starts, with the numbers."""

import doctest
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlsys.cluster import capacity
from rlsys.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def test_estimate_by_hand():
    assert doctest.testmod(capacity).failed == 0
    cfg = load_config("configs/tiny.yaml", ["model.dtype=bfloat16", "learner.zero_stage=1", "algo.beta=0"])
    need = capacity.memory_need(cfg, 10**9)
    gib = capacity.GIB
    # bf16 weights (2 GB); per rank: 0.7 + weights and gradients 4 GB + (Adam 8 GB + fp32 master 4 GB) / 2 ranks
    assert need["learners"] == pytest.approx(2 * (0.7 * gib + 4e9 + 12e9 / 2))
    assert need["generators"] == pytest.approx(2 * (0.9 * gib + 1 * gib + 2e9))


def test_check_names_the_keys_and_the_numbers():
    cfg = load_config("configs/tiny.yaml", ["generator.num_engines=64"])
    with pytest.raises(ConfigError, match=r"generator.num_engines=64 .* 24.0 GiB is available"):
        capacity.check_fits(cfg, 10**6, 24 * capacity.GIB)
    capacity.check_fits(load_config("configs/tiny.yaml"), 10**6, 24 * capacity.GIB)  # the tiny run fits


def test_too_many_engines_for_this_machine_stop_before_any_actor(tmp_path):
    """As a new user tried: 64 engines on a small machine used to start engines and thrash."""
    proc = subprocess.run([str(Path(sys.executable).with_name("rlsys")), "train", "configs/tiny.yaml",
                           "generator.num_engines=64", f"trainer.output_dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "generator.num_engines=64" in proc.stderr and "GiB is available" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists(), "nothing may be written before the run is known to fit"


def test_a_hub_id_is_not_measured_here_and_says_why(capsys, monkeypatch):
    """A hub id is resolved by the actors on their nodes: the driver's preflight skips it, in one
    line, instead of dying with "no *.safetensors in Qwen/..."."""
    monkeypatch.chdir(REPO)
    capacity.check_local_run(load_config("configs/tiny.yaml"), "Qwen/Qwen2.5-0.5B")
    assert capsys.readouterr().out == ("[rlsys] memory check skipped: model Qwen/Qwen2.5-0.5B is not a local folder "
                                       "(a hub id: the actors resolve it on their nodes, and its size is not known "
                                       "here)\n")


GPU80 = (80 * capacity.GIB, 80 * capacity.GIB)  # (free, total)


def bf16_zero1(*more):
    return load_config("configs/tiny.yaml", ["model.dtype=bfloat16", "learner.zero_stage=1", "algo.beta=0", *more])


def test_on_gpus_the_model_state_is_counted_per_gpu_and_the_host_holds_the_processes():
    """2 ZeRO-1 bf16 ranks and 2 engines for 1e9 parameters: on 4 GPUs of 80 GiB a rank holds
    2e9 + 2e9 + 12e9 / 2 = 10e9 bytes, an engine 0.9 x 80 = 72 GiB; the host 2 x 0.9 + 2 x 0.7 +
    2 x 0.4 = 4.0 GiB. 5 GiB of host memory is enough there; on CPU (no GPUs, or
    cluster.backend=gloo) the same run needs 2 x (0.9 + 1 + 1.86) + 2 x (0.7 + 9.31) GiB."""
    gib = capacity.GIB
    cfg = bf16_zero1()
    assert capacity.gpu_need(cfg, 10**9, 80 * gib) == [("learner rank 0", 10e9), ("learner rank 1", 10e9),
                                                       ("generator 0", 0.9 * 80 * gib), ("generator 1", 0.9 * 80 * gib)]
    capacity.check_fits(cfg, 10**9, 5 * gib, [GPU80] * 4)
    with pytest.raises(ConfigError, match=r"needs about 28.4 GiB of memory on this machine .* 5.0 GiB is available"):
        capacity.check_fits(cfg, 10**9, 5 * gib, [])
    with pytest.raises(ConfigError, match=r"needs about 28.4 GiB"):
        capacity.check_fits(bf16_zero1("cluster.backend=gloo"), 10**9, 5 * gib, [GPU80] * 4)
    with pytest.raises(ConfigError, match=r"needs about 4.0 GiB of memory on this machine \(generators 1.8 GiB, "
                                          r"learners 1.4 GiB, reward workers 0.8 GiB: their processes; the model's "
                                          r"state is on the GPUs"):
        capacity.check_fits(cfg, 10**9, 3 * gib, [GPU80] * 4)


def test_zero3_and_the_reference_are_partitioned_on_gpus():
    """ZeRO-3, bf16, KL on, 2 ranks, 1e9 parameters: weights 2e9 / 2, gradients 2e9 / 2, Adam
    and the fp32 master 12e9 / 2, the reference 2e9 / 2: 9e9 bytes a rank."""
    cfg = load_config("configs/tiny.yaml", ["model.dtype=bfloat16", "learner.zero_stage=3", "algo.beta=0.001"])
    assert capacity.gpu_need(cfg, 10**9, 80 * capacity.GIB)[:2] == [("learner rank 0", 9e9), ("learner rank 1", 9e9)]


def test_a_learner_rank_larger_than_its_gpu_stops_naming_the_numbers_and_keys():
    """fp32 ZeRO-0 with KL, 1e9 parameters: weights 4e9 + gradients 4e9 + Adam 8e9 + reference
    4e9 = 20e9 bytes (18.6 GiB) on a 16 GiB GPU; an engine's 0.9 x 16 = 14.4 GiB would fit."""
    gib = capacity.GIB
    with pytest.raises(ConfigError, match=r"learner rank 0 needs about 18.6 GiB of GPU memory, and the GPU left for "
                                          r"it has 16.0 GiB free \(of 16.0\): a learner rank holds 18.6 GiB \(weights, "
                                          r"gradients, optimizer, reference; model.dtype=float32, learner.zero_stage=0"):
        capacity.check_fits(load_config("configs/tiny.yaml", ["algo.beta=0.001"]), 10**9, 64 * gib,
                            [(16 * gib, 16 * gib)] * 4)


def test_an_engine_needs_its_vllm_share_free():
    """vLLM takes 0.9 of a GPU it owns: with three of four GPUs 60 GiB free of 80, the roomiest
    GPUs go to the engines (72 GiB each) and the second finds 60."""
    gib = capacity.GIB
    cfg = bf16_zero1()
    capacity.check_fits(cfg, 10**9, 64 * gib, [GPU80, GPU80, (60 * gib, 80 * gib), (60 * gib, 80 * gib)])
    with pytest.raises(ConfigError, match=r"generator 1 needs about 72.0 GiB of GPU memory, and the GPU left for it "
                                          r"has 60.0 GiB free \(of 80.0\).*generator.gpu_memory_utilization=0.90"):
        capacity.check_fits(cfg, 10**9, 64 * gib, [GPU80] + [(60 * gib, 80 * gib)] * 3)
    with pytest.raises(ConfigError, match=r"weights take 74.5 GiB on each of an engine's GPUs .* no room is left for a "
                                          r"KV cache"):
        capacity.check_fits(cfg, 40 * 10**9, 64 * gib, [GPU80] * 4)


def test_colocated_ranks_and_engines_share_a_gpu():
    """colocated: rank i (10e9 bytes) and engine i (0.45 x 80 = 36 GiB) on one GPU: 45.3 GiB."""
    gib = capacity.GIB
    cfg = bf16_zero1("cluster.placement=colocated")
    assert capacity.gpu_need(cfg, 10**9, 80 * gib) == [("learner rank 0 + generator 0", 10e9 + 36 * gib),
                                                       ("learner rank 1 + generator 1", 10e9 + 36 * gib)]
    capacity.check_fits(cfg, 10**9, 64 * gib, [GPU80] * 2)
    with pytest.raises(ConfigError, match=r"learner rank 0 \+ generator 0 needs about 45.3 GiB .* 40.0 GiB free"):
        capacity.check_fits(cfg, 10**9, 64 * gib, [(40 * gib, 80 * gib)] * 2)


def test_too_few_gpus_or_none_for_nccl_stop_naming_the_counts():
    gib = capacity.GIB
    with pytest.raises(ConfigError, match=r"this run takes 4 GPUs \(learner.num_ranks=2, generator.num_engines=2 x "
                                          r"generator.tensor_parallel_size=1, .* this machine has 3"):
        capacity.check_fits(bf16_zero1(), 10**9, 64 * gib, [GPU80] * 3)
    with pytest.raises(ConfigError, match=r"cluster.backend=nccl places the actors on GPUs, and this machine has none"):
        capacity.check_fits(bf16_zero1("cluster.backend=nccl"), 10**9, 64 * gib, [])


def test_no_visible_gpus_are_none(monkeypatch):
    """CUDA_VISIBLE_DEVICES="" hides every GPU from the local Ray cluster: none are counted (and on
    a machine without an NVIDIA driver there are none either)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert capacity.local_gpus() == []


def test_learner_activations_are_counted():
    """A rank's largest micro-batch (68 bytes a token per unit of width per layer in fp32) beside its
    state: SmolLM2-135M's shape (576 wide, 30 layers) at 32768 tokens a micro-batch is 35.9 GiB a rank,
    which 24 GiB cannot hold, though the state alone (2 x 2.7 GiB) fits; checkpointing fits it."""
    gib = capacity.GIB
    cfg = load_config("configs/tiny.yaml", ["learner.max_tokens_per_micro_batch=32768", "model.dtype=float32"])
    smollm2 = (576, 30)
    assert capacity.activation_bytes(cfg, *smollm2) == 68 * 32768 * 576 * 30
    capacity.check_fits(cfg, 134_515_008, 24 * gib)  # the shape unknown: the state alone
    with pytest.raises(ConfigError, match=r"activations 35.9 GiB for 32768 tokens a micro-batch "
                                          r"\(learner.max_tokens_per_micro_batch"):
        capacity.check_fits(cfg, 134_515_008, 24 * gib, shape=smollm2)
    cfg.learner.gradient_checkpointing = True  # each layer keeps its input: 4 x 32768 x 576 x 30 + one layer
    assert capacity.activation_bytes(cfg, *smollm2) == 4 * 32768 * 576 * 30 + 68 * 32768 * 576
    capacity.check_fits(cfg, 134_515_008, 24 * gib, shape=smollm2)
    # fixed micro-batches: micro_batch_size rows of up to generator.max_model_len tokens
    rows = load_config("configs/tiny.yaml", ["learner.max_tokens_per_micro_batch=0", "learner.micro_batch_size=4"])
    assert capacity.micro_batch_tokens(rows) == 4 * rows.generator.max_model_len


def test_activations_count_on_the_gpu_of_each_rank():
    gib = capacity.GIB
    cfg = load_config("configs/tiny.yaml", ["model.dtype=bfloat16", "learner.zero_stage=1", "algo.beta=0"])
    without = capacity.gpu_need(cfg, 10**9, 80 * gib)
    with_acts = capacity.gpu_need(cfg, 10**9, 80 * gib, activations=3 * gib)
    assert [b - a for (_, a), (_, b) in zip(without, with_acts)] == [3 * gib, 3 * gib, 0, 0]
