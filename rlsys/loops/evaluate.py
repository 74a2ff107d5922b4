"""R1-style evaluation: K samples per problem at temperature 0.6, top-p 0.95 (the paper's
protocol), pass@1 = mean correctness over the K samples averaged over problems, cons@K =
correctness of the majority answer. Generation runs on the generator actors in parallel,
scoring on the reward workers (the same rules as training, so "correct" means the same thing).
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rlsys.config import DataConfig, EvalConfig, GeneratorConfig
from rlsys.data.prompts import DataError, apply_template, check_prompt_lengths, encode
from rlsys.math.rewards import answer_key, check_golds
from rlsys.observe.metrics import tool_stats


@dataclass
class Problem:
    question: str
    gold: str
    ids: list[int]
    """The templated prompt's token ids (what the engine sees)."""


@dataclass
class ProblemResult:
    index: int
    question: str
    gold: str
    answers: list[str | None]
    """The extracted answer of each sample (None: none found)."""
    correct: list[bool]
    consensus: str | None = None
    consensus_correct: bool = False
    lengths: list[int] = field(default_factory=list)


def pass_at_1(results: list[ProblemResult]) -> float:
    """Mean over problems of the share of correct samples."""
    return statistics.fmean(statistics.fmean(r.correct) for r in results)


def consensus(answers: list[str | None], correct: list[bool]) -> tuple[str | None, bool]:
    """Majority vote over the extracted answers (whitespace-insensitive; samples with no answer
    do not vote; ties go to the answer seen first). Returns (answer, whether it is correct)."""
    keys = ["".join(a.split()) if a is not None else None for a in answers]
    votes = Counter(k for k in keys if k)
    if not votes:
        return None, False
    top = max(votes.values())
    winner = next(k for k in keys if k and votes[k] == top)
    i = keys.index(winner)
    return answers[i], correct[i]


def cons_at_k(results: list[ProblemResult]) -> float:
    return statistics.fmean(r.consensus_correct for r in results)


def require_usable_golds(golds: list[str], verifier: str, what: str) -> None:
    """rlsys.math.rewards.check_golds as a data error (file or dataset, row, value): a gold the
    verifier cannot read must stop a run before any actor starts, not days in, when its row is drawn."""
    try:
        check_golds(golds, verifier, what)
    except ValueError as e:
        raise DataError(str(e)) from None


def load_problems(cfg: EvalConfig, data: DataConfig, generator: GeneratorConfig, tokenizer, verifier: str = "auto"
                  ) -> tuple[list[Problem], str]:
    """The evaluation problems (eval.dataset: a registry name, or a .jsonl/.parquet file with the
    columns data.prompt_field / data.answer_field name) and the verifier that judges them
    (reward.verifier `verifier`, resolved), checked before any actor starts: a bad dataset name or
    split, a gold answer the verifier cannot read, or a prompt that leaves no room to answer stops
    with the key named."""
    from rlsys.data import datasets

    rows, judge = datasets.question_rows(cfg.dataset, cfg.split, cfg.limit, data, verifier,
                                         f"eval.dataset={cfg.dataset} eval.split={cfg.split}")
    require_usable_golds([a for _, a in rows], judge, f"eval dataset {cfg.dataset} (split {cfg.split})")
    ids = encode([apply_template(q, data, tokenizer) for q, _ in rows], tokenizer, data.template)
    check_prompt_lengths(ids, generator.max_model_len - (cfg.max_tokens or generator.max_tokens),
                         f"eval dataset {cfg.dataset}")
    return [Problem(q, a, row) for (q, a), row in zip(rows, ids)], judge


EVAL_STREAM = 0x5EED_E7A1
"""The sampling-seed key of evaluations, (seed, EVAL_STREAM, chunk): a stream of its own beside the
training steps' (seed, step, chunk) (rlsys.cluster.pool.chunk_seed)."""


def run_eval(groups, problems: list[Problem], cfg: EvalConfig, data: DataConfig, max_tokens: int, seed: int) -> dict:
    """Generate cfg.k samples per problem on the generator pool, score them on the reward pool; the
    answers cons@k votes on are read the way the reward workers' verifier reads them. Sampling is
    seeded (trainer.seed `seed`): the same weights give the same samples at every evaluation on a
    machine, so a run's held-out curve moves only when the weights do."""
    t0 = time.time()
    prompts = [(i, i, p.ids, p.gold) for i, p in enumerate(problems)]
    rollouts = groups.generators.generate(prompts, cfg.k, seed=(seed, EVAL_STREAM), temperature=cfg.temperature,
                                          top_p=cfg.top_p, max_tokens=cfg.max_tokens or max_tokens)
    scores = groups.rewards.score(rollouts)
    results = []
    for i, problem in enumerate(problems):
        mine = list(zip(rollouts[i * cfg.k:(i + 1) * cfg.k], scores[i * cfg.k:(i + 1) * cfg.k]))
        answers = [answer_key(data.prefill + r.model_text(), groups.rewards.cfg) for r, _ in mine]
        correct = [s.accuracy == 1.0 for _, s in mine]
        cons, cons_ok = consensus(answers, correct)
        results.append(ProblemResult(i, problem.question, problem.gold, answers, correct, cons, cons_ok,
                                     [len(r.response_ids) for r, _ in mine]))
    return {
        "pass@1": pass_at_1(results),
        f"cons@{cfg.k}": cons_at_k(results),
        "problems": len(results),
        "k": cfg.k,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "format": statistics.fmean(s.format for s in scores),
        "format/full": statistics.fmean(s.format == 1.0 for s in scores),  # R1's whole format (partial credit aside)
        "response_length/mean": statistics.fmean(n for r in results for n in r.lengths),
        **(tool_stats(rollouts) if any(r.loss_mask is not None for r in rollouts) else {}),
        "seconds": time.time() - t0,
        "results": [r.__dict__ for r in results],
    }


def table(name: str, summary: dict) -> str:
    k = summary["k"]
    return (f"{'model':<40} {'problems':>8} {'k':>3} {'pass@1':>8} {f'cons@{k}':>8}\n"
            f"{name[-40:]:<40} {summary['problems']:>8} {k:>3} {summary['pass@1']:>8.3f} "
            f"{summary[f'cons@{k}']:>8.3f}")


def write(summary: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    return out


def evaluate_model(cfg, model_path: str) -> dict:
    """cfg.eval's evaluation of `model_path` on generators and reward workers started for it."""
    from transformers import AutoTokenizer

    from rlsys.cluster.groups import init_ray, launch

    problems, verifier = load_problems(cfg.eval, cfg.data, cfg.generator, AutoTokenizer.from_pretrained(model_path),
                                       cfg.reward.verifier)
    init_ray(cfg)
    groups = launch(cfg, model_path, verifier, train=False)
    try:
        return run_eval(groups, problems, cfg.eval, cfg.data, cfg.generator.max_tokens, cfg.trainer.seed)
    finally:
        groups.shutdown()


def eval_command(model: str, dataset: str, split: str, limit: int, k: int, step: int | None, out: Path | None,
                 config: str | None, overrides: list[str]) -> int:
    """`rlsys eval`: generation settings come from CONFIG (or, for a run folder, the run's own
    config.yaml), then overrides; the model from --model."""
    import dataclasses

    from transformers import AutoTokenizer

    from rlsys.checkpoint import find_checkpoint, is_run_dir
    from rlsys.config import load_config
    from rlsys.cluster.groups import init_ray, launch
    from rlsys.data.models import resolve_model

    run = Path(model)
    if config is None and is_run_dir(run) and (run / "config.yaml").is_file():
        config = str(run / "config.yaml")
    cfg = load_config(config, overrides)
    model_path = str(find_checkpoint(run, step)) if is_run_dir(run) else resolve_model(
        dataclasses.replace(cfg.model, path=model))
    cfg.eval = dataclasses.replace(cfg.eval, dataset=dataset, split=split, limit=limit, k=k)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    problems, verifier = load_problems(cfg.eval, cfg.data, cfg.generator, tokenizer, cfg.reward.verifier)
    init_ray(cfg)
    groups = launch(cfg, model_path, verifier, train=False)
    try:
        summary = run_eval(groups, problems, cfg.eval, cfg.data, cfg.generator.max_tokens, cfg.trainer.seed)
    finally:
        groups.shutdown()
    summary |= {"model": model_path, "dataset": dataset, "split": split}
    name = Path(model_path).name if Path(model_path).exists() else model_path.replace("/", "_")
    path = write(summary, out or Path("runs") / "eval" / f"{Path(dataset).stem}-{split}-{name}-k{k}-n{len(problems)}.json")
    print(table(model_path, summary))
    print(f"[rlsys] per-problem results: {path}")
    return 0
