"""Peer benchmark, TRL side: the rlsys GRPO workload of a config run by TRL's GRPOTrainer, in this process.

Same model, same templated prompts (rlsys.data.prompts.PromptStream), same reward rule (rlsys.math.rewards), the
same GRPO settings mapped onto GRPOConfig; measured per rlsys step (one rollout batch): wall time,
prompt + completion tokens, mean reward. Generation is TRL's default (transformers generate); rlsys
uses vLLM, so the two sides differ in their generation engine by construction.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
import warnings
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rlsys.config import Config

GENERATION = "transformers generate (TRL default, use_vllm=False)"


def build_trainer(cfg: "Config", workdir: pathlib.Path, steps: int, callbacks: list | None = None):
    """TRL's GRPOTrainer on cfg's workload: (trainer, its GRPOConfig, gens), where gens gets one
    {"tokens", "reward"} entry per generation (= per rlsys step). ``steps`` rlsys steps at most.
    Shared by run_trl (throughput) and benchmarks/learning_trl.py (what it learns)."""
    # TRL imports vllm when it is installed and warns that 0.32 is newer than it supports; this run
    # does not use TRL's vLLM path (use_vllm=False).
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    from rlsys.data import datasets
    from rlsys.math import rewards
    from rlsys.data.prompts import PromptStream
    from rlsys.data.models import resolve_model

    from rlsys.config import on_device

    cfg = on_device(cfg, gpu=False)  # model.dtype=auto as rlsys resolves it here: TRL runs on this CPU (use_cpu)
    torch.set_num_threads(os.cpu_count() or 1)  # one process: give it every core
    model_path = resolve_model(cfg.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype))
    # rlsys resolves reward.verifier=auto before any scoring (trainer.preflight); so must we.
    reward_cfg = dataclasses.replace(
        cfg.reward, verifier=datasets.resolve_verifier(cfg.reward.verifier, cfg.data.name, cfg.data.path))

    # The exact prompt strings rlsys generates from (template + prefill applied): a standard,
    # non-conversational "prompt" column, so TRL tokenizes them as they are and applies no chat template.
    stream = PromptStream(cfg.data, seed=cfg.trainer.seed, tokenizer=tok)
    answers = [answer for _, answer in stream.rows]
    if len(stream.texts) < cfg.data.prompts_per_step:
        raise ValueError(f"{len(stream.texts)} prompts < data.prompts_per_step={cfg.data.prompts_per_step}: "
                         "TRL's sampler would yield no batch")
    dataset = Dataset.from_dict({"prompt": stream.texts, "answer": answers})
    # TRL tokenizes a non-conversational batch with processing_class(text=prompts): the same call here
    # gives each prompt's exact token count.
    prompt_len = dict(zip(stream.texts, map(len, tok(text=stream.texts)["input_ids"])))

    gens: list[dict[str, float]] = []  # one entry per generation (= per rlsys step)

    def reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
               answer: list[str], **_: Any) -> list[float]:
        # In this process, one sample after another: TRL has no timeout process as rlsys's reward workers do.
        out = [rewards.combine(*rewards.score(cfg.data.prefill + c, a, reward_cfg), reward_cfg)
               for c, a in zip(completions, answer)]
        tokens = sum(prompt_len[p] for p in prompts) + sum(len(ids) for ids in completion_ids)
        gens.append({"tokens": tokens, "reward": sum(out) / len(out)})
        return out

    B, M, micro = cfg.rollout_batch_size, cfg.learner.mini_batch_size, cfg.learner.micro_batch_size
    opt_per_step = cfg.learner.epochs * B // M  # optimizer steps per rollout batch, as in rlsys's learner
    args = trl.GRPOConfig(
        output_dir=str(workdir), report_to="none", use_cpu=True, seed=cfg.trainer.seed,
        bf16=cfg.model.dtype == "bfloat16", fp16=False,
        gradient_checkpointing=False,  # GRPOConfig turns it on by default; rlsys does not recompute activations
        max_steps=steps * opt_per_step, save_strategy="no", eval_strategy="no", logging_strategy="no",
        disable_tqdm=True,
        # One generation of B = prompts_per_step * group_size completions feeds B / micro micro-batches;
        # an optimizer step every M / micro of them: B / M optimizer steps per rollout batch, as in rlsys.
        per_device_train_batch_size=micro, gradient_accumulation_steps=M // micro,
        steps_per_generation=B // micro, num_iterations=cfg.learner.epochs,
        num_generations=cfg.algo.group_size, max_completion_length=cfg.generator.max_tokens,
        temperature=cfg.generator.temperature, top_p=cfg.generator.top_p, top_k=0, use_vllm=False,
        learning_rate=cfg.learner.lr, weight_decay=cfg.learner.weight_decay, max_grad_norm=cfg.learner.grad_clip,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",  # rlsys: plain torch AdamW, no schedule
        beta=cfg.algo.beta, epsilon=cfg.algo.epsilon, epsilon_high=cfg.algo.epsilon_high or cfg.algo.epsilon,
        # TRL "dapo": token sum / token count of the accumulated batch (rlsys "token");
        # TRL "grpo": per-sequence token mean, then mean over sequences (rlsys "sequence").
        loss_type="dapo" if cfg.algo.aggregation == "token" else "grpo",
        scale_rewards="group" if cfg.algo.std_normalize else "none",
    )

    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=tok, callbacks=callbacks or [])
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary line is noise here
    return trainer, args, gens


def run_trl(cfg: "Config", steps: int, workdir: pathlib.Path) -> dict:
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    import trl
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Wall time and TRL's own token counter around every optimizer step."""

        def __init__(self) -> None:
            self.first_begin: float | None = None
            self.step_s: list[float] = []
            self.seen: list[int] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.seen0 = time.perf_counter(), state.num_input_tokens_seen
            self.first_begin = self.first_begin or self.t0

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.t0)
            self.seen.append(state.num_input_tokens_seen - self.seen0)

    timer = Timer()
    trainer, args, gens = build_trainer(cfg, workdir, steps, [timer])
    B, M, micro = cfg.rollout_batch_size, cfg.learner.mini_batch_size, cfg.learner.micro_batch_size
    opt_per_step = cfg.learner.epochs * B // M
    # Seconds inside TRL's sampling call, per generation: how much of a step generation is (the
    # most any faster generator could save).
    generate_s: list[float] = []
    sample = trainer._generate_single_turn

    def timed_sample(*a, **k):
        t = time.perf_counter()
        try:
            return sample(*a, **k)
        finally:
            generate_s.append(time.perf_counter() - t)

    trainer._generate_single_turn = timed_sample
    trainer.train()

    # Optimizer steps -> rlsys steps (a rollout batch each; its generation runs inside its first optimizer step).
    step_s = [sum(timer.step_s[i:i + opt_per_step]) for i in range(0, len(timer.step_s), opt_per_step)]
    seen = [sum(timer.seen[i:i + opt_per_step]) for i in range(0, len(timer.seen), opt_per_step)]
    tokens = [g["tokens"] for g in gens]
    if len(step_s) != steps or len(gens) != steps or tokens != seen or len(generate_s) != steps:
        raise RuntimeError(f"expected {steps} steps with one generation each: {len(step_s)} steps, "
                           f"{len(gens)} generations, tokens {tokens} vs TRL's counter {seen}")
    rest = slice(1, None) if steps > 1 else slice(None)  # the first step carries the warm-up
    old_logps = args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations) != 0
    what = (
        f"One process, {torch.get_num_threads()} torch threads, no Ray/DeepSpeed. Per step: transformers "
        f"generate() samples {cfg.algo.group_size} completions for each of {cfg.data.prompts_per_step} prompts "
        f"({B} sequences, left-padded, one batch, up to {cfg.generator.max_tokens} new tokens); rewards by "
        f"rlsys.math.rewards.score + combine in-process, one after another, no timeout; group advantages; "
        + ("one no-grad forward for old log-probs; " if old_logps else
           "no old-log-prob forward (one optimizer step per rollout: TRL uses the detached current log-probs); ")
        + (f"one no-grad forward of a frozen reference model (beta={cfg.algo.beta}); " if cfg.algo.beta else
           "no reference model (beta=0); ")
        + f"{cfg.learner.epochs * B // micro} forward+backward micro-batches of {micro}, "
        f"{opt_per_step} AdamW optimizer step(s) of {M} samples."
    )
    return {
        "steps": steps, "step_s": step_s, "tokens": tokens, "reward": [g["reward"] for g in gens],
        "tokens_per_s": sum(tokens[rest]) / sum(step_s[rest]), "step_s_mean": sum(step_s[rest]) / len(step_s[rest]),
        "generate_s": generate_s, "generate_s_mean": sum(generate_s[rest]) / len(generate_s[rest]),
        "setup_s": timer.first_begin - start, "trl_version": trl.__version__, "generation": GENERATION,
        "what_it_does": what,
        # 1-min load average at start and end: above os.cpu_count() means something else competed for the cores.
        "loadavg": [load_start, os.getloadavg()[0]],
    }


if __name__ == "__main__":
    import json
    import tempfile

    from rlsys.config import load_config

    with tempfile.TemporaryDirectory(prefix="peer_trl-") as tmp:
        result = run_trl(load_config("configs/tiny.yaml", ["trainer.progress=false"]), steps=3,
                         workdir=pathlib.Path(tmp))
    print(json.dumps(result, indent=1))
