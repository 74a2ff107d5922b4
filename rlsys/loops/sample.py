"""`rlsys sample`: rejection sampling with the generator pool, written as an SFT dataset.

R1's stage 3 (R1.md): K samples per prompt from a model (a run's checkpoint, typically the
reasoning-RL one), scored by the training rules on the reward workers, filtered by
rlsys.data.traces.select (correct, well formatted, finished, language-consistent when asked, no
exact or near duplicate, at most N per prompt), written as a parquet file whose metadata records
where it came from. `rlsys sft` trains on it as it is (columns prompt and response).

Generation settings (temperature, top_p, max_tokens, engines) come from CONFIG and overrides as
for `rlsys train`; the prompts are shown in data.template, as in training. With few-shot examples
(R1 made its cold-start data by "few-shot prompting with a long CoT as an example") the sampler
sees them before each question, while the dataset written pairs the bare question with the answer:
SFT teaches the format without the examples in the prompt.

The model (a run's checkpoint, any local folder) needs to be on the driver's node alone: engines on
nodes without it get it streamed from there once per node (rlsys.data.models.ModelSource).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from rlsys.config import Config, ConfigError
from rlsys.data.prompts import DataError, apply_template, check_prompt_lengths, encode, load_shots
from rlsys.data.traces import Candidate, Filters, provenance, rejection, select, write
from rlsys.math.language import language_consistency

PROMPTS_PER_ROUND = 16
"""Prompts sent to the pool at once (the progress bar moves per round)."""


def questions(dataset: str, split: str, limit: int | None, cfg: Config) -> tuple[list[tuple[str, str]], str]:
    """(question, gold) rows of a registry dataset or a .jsonl/.parquet file, and their verifier."""
    from rlsys.data import datasets

    return datasets.question_rows(dataset, split, limit, cfg.data, cfg.reward.verifier,
                                  f"--dataset {dataset} --split {split}")


def check_sampling(cfg: Config) -> None:
    """What `rlsys sample` cannot do, refused before anything starts. generator.tools: a sample's
    text holds the tools' outputs, and `rlsys sft` trains on every token of a response, so the model
    would learn to write the outputs itself."""
    if cfg.generator.tools:
        raise ConfigError(f"generator.tools={list(cfg.generator.tools)}: rejection sampling with tools is not "
                          "supported (SFT would train on the tools' outputs as the model's own text); "
                          "sample without tools: generator.tools=[]")


def checkpoint_step(model_path: str) -> int | None:
    """The training step of a checkpoint folder (.../checkpoints/step_N), else None."""
    name = Path(model_path).name
    return int(name.removeprefix("step_")) if name.startswith("step_") and name[5:].isdigit() else None


def sample(cfg: Config, model: str, dataset: str, k: int, out: Path, filters: Filters, split: str = "train",
           limit: int | None = None, step: int | None = None, resume_file: Path | None = None,
           few_shot: str | None = None) -> tuple[Path, dict]:
    """Sample, score, select, write; returns the file and its provenance. few_shot: a .jsonl of
    worked examples (rlsys.data.prompts.load_shots) shown before every question. resume_file: every
    round's scored samples are appended there as they come, and a call that finds some continues
    after them (the pipeline's sample stages: a stage killed halfway loses one round at most)."""
    from transformers import AutoTokenizer

    from rlsys.checkpoint import find_checkpoint, is_run_dir
    from rlsys.cluster.groups import init_ray, launch
    from rlsys.data.models import resolve_model
    from rlsys.loops.evaluate import require_usable_golds

    filters.check()
    check_sampling(cfg)
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    if out.exists():
        raise FileExistsError(f"{out} exists: choose another --out (a dataset is never overwritten)")
    run = Path(model)
    model_path = str(find_checkpoint(run, step)) if is_run_dir(run) else resolve_model(
        dataclasses.replace(cfg.model, path=model))
    shots = load_shots(few_shot) if few_shot else []
    rows, verifier = questions(dataset, split, limit, cfg)
    require_usable_golds([gold for _, gold in rows], verifier, f"--dataset {dataset}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = encode([apply_template(q, cfg.data, tokenizer, shots) for q, _ in rows], tokenizer, cfg.data.template)
    check_prompt_lengths(ids, cfg.generator.max_model_len - cfg.generator.max_tokens, f"--dataset {dataset}")
    sampling = {"temperature": cfg.generator.temperature, "top_p": cfg.generator.top_p,
                "max_tokens": cfg.generator.max_tokens, "template": cfg.data.template, "prefill": cfg.data.prefill,
                "seed": cfg.trainer.seed, "few_shot": {"file": few_shot, "examples": shots} if shots else None}
    t0 = time.time()
    candidates = load_candidates(resume_file, k) if resume_file is not None else []
    done = len({c.prompt_index for c in candidates})
    passing = sum(rejection(c, filters) is None for c in candidates)  # before dedup and the cap (the bar)
    if done:
        print(f"[rlsys] sample: {done} of {len(rows)} prompts sampled before ({resume_file}); going on", flush=True)
    init_ray(cfg)
    groups = launch(cfg, model_path, verifier, train=False)
    try:
        bar = tqdm(total=len(rows), initial=done, desc="sample", unit="prompt", disable=not cfg.trainer.progress,
                   dynamic_ncols=True)
        for first in range(done, len(rows), PROMPTS_PER_ROUND):
            todo = [(i, i, ids[i], rows[i][1]) for i in range(first, min(first + PROMPTS_PER_ROUND, len(rows)))]
            rollouts = groups.generators.generate(todo, k, seed=(cfg.trainer.seed, first),
                                                  temperature=cfg.generator.temperature, top_p=cfg.generator.top_p,
                                                  max_tokens=cfg.generator.max_tokens)
            scores = groups.rewards.score(rollouts)
            scored = []
            for r, s in zip(rollouts, scores):
                i = r.prompt_index
                language = (language_consistency(cfg.data.prefill + r.model_text(), filters.language)
                            if filters.language else None)
                scored.append(Candidate(i, rows[i][0], rows[i][1], r.text, s.accuracy, s.format,
                                        r.finish_reason == "stop", language, len(r.response_ids)))
            candidates += scored
            passing += sum(rejection(c, filters) is None for c in scored)
            if resume_file is not None:
                with resume_file.open("a") as f:
                    f.writelines(json.dumps(dataclasses.asdict(c)) + "\n" for c in scored)
            bar.update(len(todo))
            bar.set_postfix(samples=len(candidates), pass_rules=passing)
        bar.close()
    finally:
        groups.shutdown()
    kept, counts = select(candidates, filters)
    prov = provenance(model_path, checkpoint_step(model_path), dataset, None if Path(dataset).suffix else split, k,
                      sampling, filters, counts, time.time() - t0)
    write(kept, out, prov)
    return out, prov


def load_candidates(path: Path, k: int) -> list[Candidate]:
    """The scored samples a killed call appended to `path`: the prompts with all k samples there
    (samples are written in prompt order, so these are the first prompts; a line cut by the kill
    and its prompt are sampled again). The file is rewritten with those alone."""
    if not path.is_file():
        return []
    got = []
    for line in path.read_text().splitlines():
        try:
            got.append(Candidate(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            break
    counts = Counter(c.prompt_index for c in got)
    whole = sorted(i for i, n in counts.items() if n == k)
    if whole != list(range(len(whole))):
        raise DataError(f"{path}: the samples of a killed `rlsys sample` are not the first prompts' "
                        f"({whole[:10]}...): delete it to sample again")
    kept = [c for c in got if counts[c.prompt_index] == k]
    path.write_text("".join(json.dumps(dataclasses.asdict(c)) + "\n" for c in kept))
    return kept


def summary(out: Path, prov: dict) -> str:
    c = prov["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("candidates", "kept", "prompts_with_a_kept_answer"))
    return (f"[rlsys] wrote {out}: kept {c['kept']} of {c['candidates']} samples "
            f"({c['prompts_with_a_kept_answer']} prompts with at least one); dropped: {dropped or 'none'}; "
            f"{prov['seconds']:.0f}s")
