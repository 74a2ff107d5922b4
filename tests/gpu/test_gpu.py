"""Checks that need CUDA GPUs: marker `gpu`, skipped (saying why) where there are none. Run them on
a GPU node with the gpu extra installed (CUDA vLLM, on the torch the CPU suite tests):

    pip install -e '.[gpu,test]'
    pytest -m gpu tests/gpu

NONE OF THESE HAS RUN YET: no machine rlsys has been developed on had a GPU (README, "Running on
GPUs"). Each is the GPU twin of a check the CPU suite runs on the same functions, named in its
docstring; only the device, the collective (NCCL) and the kind of handle (CUDA IPC) differ.
"""

from __future__ import annotations

import pytest
import ray
import torch

from rlsys.cluster.groups import launch
from rlsys.cluster.learners import start_learner_group
from rlsys.config import load_config
from rlsys.data.models import resolve_model

from test_learner import ADV, LENGTHS, toy_batch
from test_sync import CONFIG, assert_serves, one_step, served_as_learner, tp_shard, vllm_names

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")]


def gpus(n: int):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs, "
                                                                    f"{torch.cuda.device_count()} here")


def trained_and_pushed(overrides: list[str]):
    """A learner step on GPUs, then the push: the groups (to check, then shut down) and the learner's weights."""
    from transformers import AutoTokenizer

    cfg = load_config(CONFIG, ["cluster.backend=nccl", "learner.sync_bucket_mb=0.05", *overrides])
    model_path = resolve_model(cfg.model)
    groups = launch(cfg, model_path, verifier="math")
    one_step(groups, cfg, AutoTokenizer.from_pretrained(model_path))
    assert groups.sync.push(version=1) == [1] * len(groups.generators.engines)
    return groups, groups.learner.full_state_dict()


@gpus(2)
def test_one_learner_and_one_engine_push_over_nccl(ray_cluster):
    """tests/test_sync.py's fp32-collective case on GPUs: a rank and an engine on GPUs of their
    own, the push over NCCL; the engine serves exactly the learner's (bf16: model.dtype=auto) weights."""
    groups, learner = trained_and_pushed(["learner.num_ranks=1", "generator.num_engines=1", "learner.zero_stage=1",
                                          "learner.sync_by_handle=false"])
    try:
        assert groups.sync.members == [0]  # over the collective
        assert next(iter(learner.values())).dtype == torch.bfloat16
        assert_serves(groups.generators.actors[0], vllm_names(learner))
    finally:
        groups.shutdown()


@gpus(3)
def test_a_tensor_parallel_engine_serves_its_shards(ray_cluster):
    """tests/test_sync.py's tensor-parallel test on GPUs: one rank, one engine over two GPUs; each
    worker serves exactly its shard."""
    from transformers import AutoConfig

    groups, learner = trained_and_pushed(["learner.num_ranks=1", "generator.num_engines=1", "learner.zero_stage=1",
                                          "generator.tensor_parallel_size=2", "learner.sync_by_handle=false"])
    try:
        hf_cfg = AutoConfig.from_pretrained(resolve_model(load_config(CONFIG).model))
        workers = ray.get(groups.generators.actors[0].served_weights.remote())
        assert len(workers) == 2
        for rank, served in enumerate(workers):
            for name in vllm_names(learner):
                want = tp_shard(name, learner, rank, 2, hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads)
                assert served_as_learner(served[name][:want.shape[0]] if "embed" in name or "lm_head" in name
                                         else served[name], want), (rank, name)
    finally:
        groups.shutdown()


@gpus(1)
@pytest.mark.parametrize("level", [1, 2])
def test_colocated_push_by_cuda_ipc_around_sleep_and_offload(ray_cluster, level):
    """tests/test_shared_weights.py and tests/test_sharing_a_gpu.py on a GPU: learner rank 0 and
    engine 0 share one GPU; the rank's state goes to host memory while the engine generates, the
    engine sleeps while the rank trains (freeing GPU memory), wakes for the push, which goes by
    CUDA IPC handle (no NCCL group: NCCL refuses two ranks on one GPU), and serves exactly the
    learner's weights; it then generates."""
    from transformers import AutoTokenizer

    cfg = load_config(CONFIG, ["cluster.backend=nccl", "cluster.placement=colocated", "learner.num_ranks=1",
                               "generator.num_engines=1", "learner.zero_stage=1", f"generator.sleep_level={level}"])
    model_path = resolve_model(cfg.model)
    groups = launch(cfg, model_path, verifier="math")
    try:
        engine = groups.generators.engines[0]
        assert groups.sync.by_hand(engine) and groups.sync.members == []
        assert groups.learner.offloads and groups.generators.sleeps

        def free_bytes() -> int:
            return ray.get(engine.actor.__ray_call__.remote(lambda self: torch.cuda.mem_get_info()[0]))

        groups.learner.offload()
        prompts, _ = one_step(groups, cfg, AutoTokenizer.from_pretrained(model_path))
        awake = free_bytes()
        groups.generators.sleep()
        assert free_bytes() > awake, "the engine's sleep freed no GPU memory"
        assert groups.sync.push(version=1) == [1]
        assert_serves(engine.actor, vllm_names(groups.learner.full_state_dict()))
        rollouts = groups.generators.generate([p.request(g) for g, p in enumerate(prompts)], 2)
        assert rollouts and all(r.weight_version == 1 and r.response_ids for r in rollouts)
    finally:
        groups.shutdown()


@gpus(1)
def test_a_bf16_learner_step_on_cuda_matches_the_same_step_on_cpu(ray_cluster):
    """The same bf16 ZeRO-1 update of the tiny model on one GPU and on CPU (tests/test_learner.py's
    bf16 tests, the device changed): the loss within 1e-2 and every weight within rtol 1e-2 / atol
    1e-3 (bf16 keeps about 3 significant digits; CUDA and CPU kernels sum in other orders, and one
    step of lr 1e-3 moves weights by ~1e-3: a wrong gradient would move them the wrong way by that much)."""
    common = ["learner.num_ranks=1", "learner.zero_stage=1", "model.dtype=bfloat16", "learner.mini_batch_size=8",
              "learner.micro_batch_size=4", "learner.share_prompts=false", "learner.skip_zero_advantage=false"]
    runs = {}
    for backend in ("nccl", "gloo"):
        cfg = load_config(CONFIG, [f"cluster.backend={backend}", *common])
        group, pg = start_learner_group(cfg, resolve_model(cfg.model), updates=1, placement_name=f"rlsys-{backend}")
        try:
            metrics = group.train(toy_batch(LENGTHS, ADV))
            runs[backend] = (metrics, group.full_state_dict())
        finally:
            group.shutdown(pg)
    (cuda_m, cuda_w), (cpu_m, cpu_w) = runs["nccl"], runs["gloo"]
    assert abs(cuda_m["loss"] - cpu_m["loss"]) < 1e-2, (cuda_m["loss"], cpu_m["loss"])
    initial = resolve_model(load_config(CONFIG).model)
    from safetensors.torch import load_file

    start = load_file(f"{initial}/model.safetensors")
    assert any(not torch.equal(cpu_w[k].float(), start[k].float()) for k in start), "the step changed nothing"
    for name in cpu_w:
        assert torch.allclose(cuda_w[name].float().cpu(), cpu_w[name].float(), rtol=1e-2, atol=1e-3), name


@gpus(3)
def test_a_two_gpu_zero3_learner_group_pushes_from_both_ranks(ray_cluster):
    """tests/test_sync.py's zero3-bf16-collective case on GPUs: two ZeRO-3 ranks each send their
    partition of every bucket over NCCL (learner.sync_from_all_ranks: all under ZeRO-3); the engine
    puts them together and serves exactly the learner's weights."""
    groups, learner = trained_and_pushed(["learner.num_ranks=2", "generator.num_engines=1", "learner.zero_stage=3",
                                          "learner.sync_by_handle=false"])
    try:
        assert groups.sync.shards == 2
        assert_serves(groups.generators.actors[0], vllm_names(learner))
    finally:
        groups.shutdown()
