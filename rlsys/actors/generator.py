"""One rollout generator: a plain class around one vLLM engine (Ray is applied in rlsys/cluster/).

The engine runs in this process (`distributed_executor_backend="uni"`) when it has one worker,
which starts in seconds; with tensor parallelism its workers are processes of their own (on GPU,
and on CPU with one OpenMP core set per worker). Either way the weight sync runs inside the
workers as vLLM worker-extension methods (rlsys.actors.engine_worker.WorkerExtension) called by name.
Weights change only through `receive_weights`, which also bumps the version every rollout carries.

Prompts arrive as token ids, tokenised once by rlsys (rlsys.data.prompts): the engine never re-tokenises
text, so a chat template's BOS is not doubled and the prompt-length check counts exactly what the
engine sees. Log-probs are vLLM's processed ones (after temperature), the distribution the tokens
were sampled from, which is what the learner recomputes.
"""

from __future__ import annotations

import os

from rlsys.config import CodeConfig, GeneratorConfig
from rlsys.types import PromptRequest, Rollout
from rlsys.actors.engine_worker import WORKER_EXTENSION, plan_to_wire
from rlsys.actors.weight_sync import Bucket


def engine_env(cfg: GeneratorConfig, local_index: int | None = None, local_engines: int = 1,
               node_cores: list[int] | None = None) -> dict[str, str]:
    """Environment an engine's process needs before vllm is imported.

    A CPU engine with tensor parallelism binds its workers' OpenMP threads (VLLM_CPU_OMP_THREADS_BIND).
    Without more, every engine on a node computes the same lists from the cores it may use (Ray does
    not pin actors), so two such engines pin their threads onto the same cores; given its index among
    the node's engines and the node's cores, each engine takes its own slice (engine_cores). Measured
    on 2 cores, two 1-thread engines pinned to the same core made 34 + 34 tokens/s, on their own cores
    82 + 83 (benchmarks/cpu_tuning.py). An in-process engine (tensor_parallel_size 1) binds nothing:
    vLLM ignores the variable there, and leaving its thread to the scheduler measured as fast as
    pinning it."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib), "TOKENIZERS_PARALLELISM": "false",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    if cfg.tensor_parallel_size == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: fast start, direct reach
    elif local_index is not None and node_cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(
            engine_cores(node_cores, local_engines, local_index), cfg.tensor_parallel_size)
    return env


def engine_cores(cores: list[int], engines: int, index: int) -> list[int]:
    """The cores engine `index` of `engines` on one node binds to: disjoint contiguous slices, the
    remainder spread over the first ones; with fewer cores than engines, engines share cores round-robin.

    >>> engine_cores([0, 1, 2, 3, 4, 5, 6, 7], 2, 1)
    [4, 5, 6, 7]
    >>> engine_cores([0, 1, 2, 3, 4], 2, 0), engine_cores([0, 1, 2, 3, 4], 2, 1)
    ([0, 1, 2], [3, 4])
    >>> engine_cores([0, 1], 4, 3)
    [1]
    """
    cores = sorted(cores)
    if not 0 <= index < engines:
        raise ValueError(f"engine index {index} is not one of {engines} engines")
    if len(cores) < engines:
        return [cores[index % len(cores)]]
    per, extra = divmod(len(cores), engines)
    start = index * per + min(index, extra)
    return cores[start:start + per + (index < extra)]


def cpu_thread_binding(cores: list[int], workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for a tensor-parallel CPU engine: the cores this process may use,
    cut into one contiguous list per worker ("0|1", "0,1|2,3"). vLLM's own "auto" binds one NUMA
    node per worker and refuses to start with more workers than nodes (a 1-node machine).

    >>> cpu_thread_binding([0, 1, 2, 3], 2)
    '0,1|2,3'
    >>> cpu_thread_binding([0], 2)  # fewer cores than workers: they share
    '0|0'
    """
    cores = sorted(cores)
    if len(cores) < workers:
        return "|".join(str(cores[i % len(cores)]) for i in range(workers))
    per = len(cores) // workers
    return "|".join(",".join(map(str, cores[i * per:(i + 1) * per])) for i in range(workers))


def eager(cfg: GeneratorConfig, cuda: bool) -> bool:
    """generator.enforce_eager, or when None by the device this engine runs on (not the driver's).

    >>> eager(GeneratorConfig(), cuda=False), eager(GeneratorConfig(), cuda=True), eager(GeneratorConfig(enforce_eager=True), cuda=True)
    (True, False, True)
    """
    return (not cuda) if cfg.enforce_eager is None else cfg.enforce_eager


COMMUNICATOR_BYTES = 2 * 4 * 2**20 * 32
"""GPU memory one NCCL communicator may take: NCCL_BUFFSIZE (4 MiB by default) sent and received
on each of up to 32 channels. An upper bound: NCCL opens fewer channels on a slower link."""


def engine_memory(share: float, communicators: int, gpu_bytes: int) -> tuple[float, int]:
    """vLLM's gpu_memory_utilization with room left for the weight-sync communicators each of the
    engine's workers joins after vLLM has taken its share (one per sending learner rank:
    rlsys.actors.weight_sync.sending_ranks); returns (utilization, bytes left for them).

    >>> engine_memory(0.9, 1, 80 * 2**30)
    (0.896875, 268435456)
    """
    reserve = communicators * COMMUNICATOR_BYTES
    return share - reserve / gpu_bytes, reserve


def usable_sleep_level(level: int, available: bool) -> int:
    """The sleep level an engine uses: generator.sleep_level (resolved by rlsys.config.sleep_level)
    where its vLLM has sleep mode, else 0, said once (the run goes on awake).

    >>> usable_sleep_level(2, available=True), usable_sleep_level(0, available=False)
    (2, 0)
    """
    if level and not available:
        print(f"[rlsys] generator.sleep_level={level}: this vLLM build has no sleep mode (only its CUDA "
              f"builds do); the engine stays awake between pushes", flush=True)
        return 0
    return level


class Generator:
    def __init__(self, model_path: str, cfg: GeneratorConfig, dtype: str, seed: int, communicators: int = 1,
                 code: CodeConfig | None = None):
        """communicators: the weight-sync groups each worker will join (one per sending learner
        rank); on GPUs their memory is left out of vLLM's share (engine_memory). code: the sandbox
        settings of the python tool (reward.code), when generator.tools lists it."""
        for k, v in engine_env(cfg).items():
            os.environ.setdefault(k, v)
        import torch

        if cfg.tensor_parallel_size > 1 and not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                                  cpu_thread_binding(list(os.sched_getaffinity(0)), cfg.tensor_parallel_size))
        from vllm import LLM
        from vllm.platforms import current_platform

        self.cfg = cfg
        self.version = 0
        self.tool_sandbox = None
        if "python" in cfg.tools:  # probed now: a machine that cannot sandbox stops at start, not mid-rollout
            from rlsys.sandbox.judge import limits_of, open_sandbox

            assert code is not None, "generator.tools=[python] needs the sandbox settings (reward.code)"
            self.tool_sandbox, self.tool_limits = open_sandbox(code, concurrency=8), limits_of(code)
        self.sleep_level = usable_sleep_level(cfg.sleep_level or 0, current_platform.is_sleep_mode_available())
        self.asleep = False
        # None: the launcher resolves it from the placement (rlsys.config.engine_memory_share); unused on CPU
        share = 0.9 if cfg.gpu_memory_utilization is None else cfg.gpu_memory_utilization
        if torch.cuda.is_available():
            gpu_bytes = torch.cuda.mem_get_info()[1]
            share, reserve = engine_memory(share, communicators, gpu_bytes)
            print(f"[rlsys] generator: vLLM takes {share:.3f} of the GPU; {reserve / 2**30:.2f} GiB of "
                  f"{gpu_bytes / 2**30:.0f} GiB left for {communicators} weight-sync communicator(s)", flush=True)
        # A per-request seed crashes the CPU engine (vllm-cpu 0.32.0): the engine's sampler is
        # reseeded per call instead (generate(seed=...)).
        self.llm = LLM(
            model_path, dtype=dtype, seed=seed, max_model_len=cfg.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching, enforce_eager=eager(cfg, torch.cuda.is_available()),
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=share,
            distributed_executor_backend="uni" if cfg.tensor_parallel_size == 1 else "mp",
            worker_extension_cls=WORKER_EXTENSION, logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.sleep_level > 0,
        )
        if not torch.cuda.is_available():  # each push reallocates the layers vLLM reloads: keep them on the heap
            self.llm.collective_rpc("rlsys_keep_freed_memory")
        if cfg.tools and cfg.tool_output == "turn":  # a template without a tool role stops the start, named
            from rlsys.actors.tools import chat_tool_turn

            chat_tool_turn(self.llm.get_tokenizer(), "0")

    def generate(self, prompts: list[PromptRequest], n: int, greedy: bool = False,
                 temperature: float | None = None, top_p: float | None = None, max_tokens: int | None = None,
                 min_tokens: int = 0, seed: int | None = None) -> list[Rollout]:
        """n rollouts per prompt, in order. Sampling settings default to the config's (training);
        evaluation passes its own. seed: every worker's sampler is reseeded first, so that this
        call samples the same tokens on any engine, new or old."""
        from vllm import SamplingParams

        self.wake_up()  # normally awake already: the push that follows a sleep wakes the engine
        if seed is not None:
            self.llm.collective_rpc("rlsys_reseed", args=(seed,))
        if greedy:
            temperature, top_p = 0.0, 1.0
        params = SamplingParams(
            n=n, temperature=self.cfg.temperature if temperature is None else temperature,
            top_p=self.cfg.top_p if top_p is None else top_p,
            max_tokens=max_tokens or self.cfg.max_tokens, min_tokens=min_tokens, logprobs=0,
        )
        if self.cfg.tools:
            return self._generate_with_tools(prompts, n, params)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for _, _, ids, _ in prompts], params, use_tqdm=False)
        rollouts = []
        for (group, row, ids, answer), out in zip(prompts, outputs):
            assert list(out.prompt_token_ids) == ids, f"the engine changed the prompt of row {row}"
            for c in out.outputs:
                # logprobs=0 returns exactly the sampled token's entry at each position.
                logprobs = [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)]
                rollouts.append(Rollout(
                    prompt_index=row, group=group, prompt_ids=list(ids),
                    response_ids=list(c.token_ids), response_logprobs=logprobs, text=c.text,
                    finish_reason=c.finish_reason, weight_version=self.version, answer=answer,
                ))
        return rollouts

    def _generate_with_tools(self, prompts: list[PromptRequest], n: int, params) -> list[Rollout]:
        """generator.tools: n multi-turn rollouts per prompt (rlsys.actors.tools.multi_turn), each turn
        one engine call for every rollout still going (the prefix cache holds the earlier turns)."""
        from vllm import SamplingParams

        from rlsys.actors.tools import Turn, chat_tool_turn, multi_turn, output_block, stop_strings

        tokenizer = self.llm.get_tokenizer()
        stops = stop_strings(self.cfg.tools)

        def engine_step(contexts: list[list[int]], budgets: list[int]) -> list[Turn]:
            turn_params = [SamplingParams(n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=b,
                                          logprobs=0, stop=stops, include_stop_str_in_output=True) for b in budgets]
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in contexts], turn_params, use_tqdm=False)
            turns = []
            for out in outputs:
                c = out.outputs[0]
                turns.append(Turn(list(c.token_ids), [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)],
                                  c.text, c.finish_reason, c.stop_reason if isinstance(c.stop_reason, str) else None))
            return turns

        requests = [req for req in prompts for _ in range(n)]
        wrap = output_block if self.cfg.tool_output == "block" else lambda out: chat_tool_turn(tokenizer, out)
        done = multi_turn([ids for _, _, ids, _ in requests], engine_step,
                          lambda text: tokenizer.encode(text, add_special_tokens=False), self.cfg.tools,
                          self.cfg.max_turns, params.max_tokens, self._run_tool, wrap)
        return [Rollout(prompt_index=row, group=group, prompt_ids=list(ids), response_ids=r.response_ids,
                        response_logprobs=r.logprobs, text=r.text, own_text=r.own_text, finish_reason=r.finish_reason,
                        weight_version=self.version, answer=answer, loss_mask=r.loss_mask, turns=r.turns,
                        tool_calls=r.tool_calls, tool_errors=r.tool_errors, tool_seconds=r.tool_seconds)
                for (group, row, ids, answer), r in zip(requests, done)]

    def _run_tool(self, tool: str, call: str) -> tuple[str, bool]:
        """(output, failed) of one call: the calculator here, a program in the sandbox (its stdout)."""
        from rlsys.actors.tools import run_calculator

        if tool == "calculator":
            return run_calculator(call)
        run = self.tool_sandbox.python_source(call, self.tool_limits)
        if run.ok:
            return run.stdout.strip(), False
        return f"error: {run.reason}", True

    def join_sync(self, rendezvous: list[tuple[str, int]], first_rank: int, world: int, backend: str,
                  timeout_s: float) -> list[int]:
        """Join the sync group of every sending learner rank ((addr, port) each, in rank order);
        timeout_s: how long its collectives may wait (deadlines.sync_s)."""
        return self.llm.collective_rpc("rlsys_join", args=([list(r) for r in rendezvous], first_rank, world, backend,
                                                           timeout_s))

    def receive_weights(self, plan: list[Bucket], version: int, shards: int = 1,
                        shares: list[dict] | None = None) -> tuple[int, list[list[int]]]:
        """Receive and load every bucket (in `shards` pieces each: weight_sync.receive_buckets), from
        the sync groups, or by handle from the sending learner ranks' shared buffers (`shares`, one
        per sending rank, as Learner.share_weights returns them: rlsys.actors.shared_weights);
        returns (the version now served, each worker's checksum of every bucket as received)."""
        if self.asleep:  # weight memory first (level 2: empty, the push fills it), the KV cache after
            self.llm.wake_up(tags=["weights"])
        sums = self.llm.collective_rpc("rlsys_receive", args=(plan_to_wire(plan), shards, shares))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        # Cached prefixes hold KV computed by the old weights: drop them, every time.
        self.llm.reset_prefix_cache()
        self.version = version
        return version, sums

    def sleep(self) -> bool:
        """Free the engine's GPU memory for the learner (generator.sleep_level) until the next push
        or generation; False where the engine does not sleep (level 0, or no sleep mode here)."""
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True
        return self.asleep

    def wake_up(self) -> None:
        """Wake whole (before generating without a push first, as an evaluation of a resumed run may)."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def receive_wire(self, plan: list[Bucket], shards: int = 1,
                     shares: list[dict] | None = None) -> tuple[None, list[list[int]]]:
        """The receiving end of a push without the load (the sync benchmark's wire part): the
        engine keeps serving the weights it has. Returns (None, each worker's checksums)."""
        return None, self.llm.collective_rpc("rlsys_receive_wire", args=(plan_to_wire(plan), shards, shares))

    def receive_raw(self, numel: int, dtype: str) -> None:
        """The receiving end of Learner.broadcast_raw (the sync benchmark's reference)."""
        self.llm.collective_rpc("rlsys_receive_raw", args=(numel, dtype))

    def receive_seconds(self) -> tuple[float, float]:
        """(whole receive, waiting on the wire) of the last receive_weights, worker 0."""
        total, waited = self.llm.collective_rpc("rlsys_receive_seconds")[0]
        return total, waited

    def served_weights(self) -> list[dict]:
        """What every worker of the engine serves (its shard), by vLLM parameter name; for checks."""
        from safetensors.torch import load

        return [load(blob) for blob in self.llm.collective_rpc("rlsys_served_weights")]
