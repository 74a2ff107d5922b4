"""pass@1 and cons@K on hand-made results; checkpoint lookup and export."""

import pytest

from rlsys.checkpoint import export, find_checkpoint, list_checkpoints
from rlsys.loops.evaluate import ProblemResult, cons_at_k, consensus, pass_at_1


def result(answers, correct):
    cons, ok = consensus(answers, correct)
    return ProblemResult(0, "q", "g", answers, correct, cons, ok)


def test_pass_at_1_is_the_mean_over_problems_of_the_mean_over_samples():
    # problem A: 1 of 4 correct (0.25); problem B: 4 of 4 (1.0); problem C: 0 of 4 -> (0.25 + 1 + 0) / 3
    rs = [result(["1", "2", "3", "4"], [True, False, False, False]),
          result(["5"] * 4, [True] * 4),
          result([None] * 4, [False] * 4)]
    assert pass_at_1(rs) == pytest.approx(1.25 / 3)


def test_consensus_majority_ties_and_no_answers():
    # "7" twice beats "8" once: correct if the "7"s are correct
    assert consensus(["7", "8", "7", None], [True, False, True, False]) == ("7", True)
    # whitespace does not split a vote: " 1 / 2" and "1/2" are one answer with 2 votes, beating "3"
    # (seen first: with the votes split, every answer would have 1 and "3" would win the tie)
    assert consensus(["3", " 1 / 2", "1/2", "4"], [True, False, False, False]) == (" 1 / 2", False)
    assert consensus(["5", "6 ", "6"], [False, True, True]) == ("6 ", True)
    # tie 2-2: the answer seen first wins
    assert consensus(["3", "1/2", "1/2", "3"], [True, False, False, True]) == ("3", True)
    # samples without an answer do not vote; all None: no consensus, counted wrong
    assert consensus([None, None, "4"], [False, False, False]) == ("4", False)
    assert consensus([None, None], [False, False]) == (None, False)


def test_cons_at_k_can_beat_or_trail_pass_at_1():
    rs = [result(["7", "7", "8", "9"], [True, True, False, False]),   # majority right, pass 0.5
          result(["1", "2", "2", "2"], [True, False, False, False])]  # majority wrong, pass 0.25
    assert cons_at_k(rs) == 0.5 and pass_at_1(rs) == pytest.approx(0.375)


def test_checkpoints_found_latest_or_by_step_and_exported(tmp_path):
    for step in (2, 10):
        (tmp_path / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step}" / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_12.partial").mkdir()  # half-written: never listed
    assert sorted(list_checkpoints(tmp_path)) == [2, 10]
    assert find_checkpoint(tmp_path).name == "step_10"
    assert find_checkpoint(tmp_path, 2).name == "step_2"
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 3"):
        find_checkpoint(tmp_path, 3)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        find_checkpoint(tmp_path / "elsewhere")
    (tmp_path / "checkpoints" / "step_2" / "learner").mkdir()  # resume state: not exported
    (tmp_path / "checkpoints" / "step_2" / "trainer_state.json").write_text("{}")
    out = export(tmp_path, tmp_path / "out", step=2)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    with pytest.raises(FileExistsError):
        export(tmp_path, tmp_path / "out")


def test_eval_problems_come_from_a_registry_name_or_a_prepared_file_with_its_verifier(tmp_path):
    """eval.dataset may be a file: a parquet from `rlsys data prepare` (reasoning-gym chain sums with
    options) gives its rows and its recorded verifier; a jsonl without metadata is judged as math;
    an unknown name stops with the key named."""
    import json

    from transformers import AutoTokenizer

    from rlsys.config import DataConfig, EvalConfig, GeneratorConfig, ModelConfig
    from rlsys.data.datasets import prepare
    from rlsys.data.models import resolve_model
    from rlsys.data.prompts import DataError
    from rlsys.loops.evaluate import load_problems

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(ModelConfig()))
    data, generator = DataConfig(template="none"), GeneratorConfig(max_tokens=8, max_model_len=256)
    sums = prepare("chain_sum", "test", tmp_path / "sums.parquet", 5,
                   options={"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2})
    problems, verifier = load_problems(EvalConfig(dataset=str(sums), limit=3), data, generator, tokenizer)
    assert verifier == "reasoning_gym" and len(problems) == 3
    # a reasoning-gym gold is the task entry its scorer reads (the answer inside)
    assert all(json.loads(p.gold)["answer"].lstrip("-").isdigit() and "arithmetic problem" in p.question for p in problems)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{a} + 1 =", "answer": str(a + 1)}) + "\n" for a in range(4)))
    problems, verifier = load_problems(EvalConfig(dataset=str(rows), limit=None), data, generator, tokenizer)
    assert verifier == "math" and [p.gold for p in problems] == ["1", "2", "3", "4"]
    with pytest.raises(DataError, match="eval.dataset=gsm9k"):
        load_problems(EvalConfig(dataset="gsm9k"), data, generator, tokenizer)
    with pytest.raises(DataError, match=r"eval.dataset=.*rows.jsonl eval.split=test: limit must be >= 1, got 0"):
        load_problems(EvalConfig(dataset=str(rows), limit=0), data, generator, tokenizer)


def test_run_eval_seeds_its_sampling_and_votes_on_what_the_verifier_reads():
    """Evaluation samples with (trainer.seed, EVAL_STREAM, chunk) seeds, so the same weights give the
    same samples every time (a run's held-out curve moves only with its weights), and cons@k votes
    on the number the verifier read: "40 + 27 = 67" and "so 67." are one vote."""
    from types import SimpleNamespace

    from rlsys.config import DataConfig, EvalConfig, RewardConfig
    from rlsys.loops.evaluate import EVAL_STREAM, Problem, run_eval
    from rlsys.math.rewards import accuracy
    from rlsys.types import RewardResult, Rollout

    texts = [" 40 + 27 = 67</think>", " so 67.", " 40 + 27 =</think> 13", " 68"]
    calls = []

    def generate(prompts, n, seed=None, **sampling):
        calls.append((seed, sampling))
        return [Rollout(prompt_index=0, group=0, prompt_ids=[1], response_ids=[2] * (i + 1), response_logprobs=[0.0],
                        text=t, finish_reason="stop", weight_version=0, answer="67") for i, t in enumerate(texts)]

    reward = RewardConfig(verifier="number", require_answer_tag=False)

    def score(rollouts):
        return [RewardResult(reward=a, accuracy=a, format=0.0, timed_out=False)
                for a in (accuracy("<think>" + r.text, r.answer, reward) for r in rollouts)]

    groups = SimpleNamespace(generators=SimpleNamespace(generate=generate),
                             rewards=SimpleNamespace(score=score, cfg=reward))
    summary = run_eval(groups, [Problem("40 + 27 =", "67", [1])], EvalConfig(k=4), DataConfig(prefill="<think>"),
                       max_tokens=32, seed=7)
    assert calls[0][0] == (7, EVAL_STREAM)
    assert summary["results"][0]["answers"] == ["67", "67", "13", "68"]
    assert summary["pass@1"] == 0.5 and summary["cons@4"] == 1.0
