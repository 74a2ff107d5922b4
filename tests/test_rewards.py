import doctest
import json

import pytest

import rlsys.math.rewards as rewards
from rlsys.config import RewardConfig
from rlsys.data import datasets
from rlsys.math.rewards import (GoldError, accuracy, accuracy_reward, check_golds, combine, extract_answer, format_reward,
                           format_score, score)


def tagged(answer: str, think: str = "reasoning") -> str:
    return f" <think> {think} </think> <answer> {answer} </answer>"


# -- format ------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion", [
    " <think> 2 + 2 = 4 </think> <answer> 4 </answer>",
    "<think>a</think><answer>4</answer>",                              # no whitespace at all
    "\n\n  <think>\nmulti\nline\n</think>\n\n<answer>\n4\n</answer>\n  ",  # leading/trailing ws
    " <think></think> <answer> 4 </answer>",                           # empty think is allowed
])
def test_format_good(completion):
    assert format_reward(completion) == 1.0


@pytest.mark.parametrize("completion", [
    " <answer> 4 </answer>",                                           # missing think
    " <think> a </think>",                                             # missing answer
    " <think> a </think> 4",                                           # missing answer tags
    " <think> a </think> <answer> 4 </answer> so 4",                   # text after </answer>
    " <think> a </think> <answer> 4 </answer> <answer> 5 </answer>",   # two answer blocks
    " <think> a <think> b </think> </think> <answer> 4 </answer>",     # nested think
    " <think> a </think> <think> b </think> <answer> 4 </answer>",     # extra think block
    " <think> a </think> <answer> 4 </answer> </think>",               # stray closing tag
    " <think> a <answer> 3 </answer> </think> <answer> 4 </answer>",   # answer inside think
    " <think> a </think> <answer> <answer> 4 </answer>",               # extra answer tag
    " <think> a </think> <answer>  \n </answer>",                      # blank answer
    " <think> a </think> <answer></answer>",                           # empty answer
    " Sure. <think> a </think> <answer> 4 </answer>",                  # text before <think>
    " <answer> 4 </answer> <think> a </think>",                        # wrong order
    " <think> a </think> b <answer> 4 </answer>",                      # text between blocks
    " <think> a <answer> 4 </answer>",                                 # unclosed think
    " <think> a </think> <answer> 4",                                  # unclosed answer
    "",
])
def test_format_bad(completion):
    assert format_reward(completion) == 0.0


# -- extract_answer ----------------------------------------------------------------------------

def test_extract_answer():
    assert extract_answer(tagged("42"), require_tag=True) == "42"
    assert extract_answer(tagged("42"), require_tag=False) == "42"
    two = " <answer> 41 </answer> <answer> 42 </answer>"
    assert extract_answer(two, require_tag=True) is None
    assert extract_answer(two, require_tag=False) is None
    free = " so the answer is 42"
    assert extract_answer(free, require_tag=True) is None
    assert extract_answer(free, require_tag=False) == free
    # An unclosed block is not a block.
    assert extract_answer(" <answer> 42", require_tag=True) is None


# -- accuracy ----------------------------------------------------------------------------------

EQUIVALENT = ["0.5", "1/2", "\\frac{1}{2}", "\\frac12", "\\boxed{\\frac12}", "$\\frac{1}{2}$", "\\dfrac{1}{2}"]


@pytest.mark.parametrize("gold", EQUIVALENT)
@pytest.mark.parametrize("answer", EQUIVALENT)
def test_accuracy_half_all_forms(answer, gold):
    assert accuracy_reward(tagged(answer), gold) == 1.0


@pytest.mark.parametrize("answer,gold", [
    ("3", "3.0"), ("3.0", "3"), ("12", "\\boxed{12}"), ("\\boxed{12}", "12"), ("42", "42"),
    ("x = 3", "3"), ("1,000", "1000"), ("-5", "-5"), ("\\sqrt{2}", "\\sqrt 2"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"), ("0.75", "\\frac{3}{4}"), ("\\$18", "18"),
    ("18 apples", "18"), ("\\pi", "\\pi"), ("2^{10}", "1024"),
])
def test_accuracy_equivalent(answer, gold):
    assert accuracy_reward(tagged(answer), gold) == 1.0


@pytest.mark.parametrize("answer,gold", [
    ("41", "42"), ("0.5", "\\frac{1}{3}"), ("\\frac{1}{2}", "0.25"), ("12", "\\boxed{13}"),
    ("3 or 5", "5"), ("3, 5", "3"),           # listing candidates is not an answer
    ("2x+3", "2"),                            # no "first number" guessing inside the tag
    ("0.333", "\\frac{1}{3}"),                # beyond 6-decimal rounding
    ("", "4"),
])
def test_accuracy_wrong(answer, gold):
    assert accuracy_reward(tagged(answer), gold) == 0.0


def test_accuracy_bare_integer_in_tag():
    # Numbers inside <think> must not count; only the tag's content does.
    assert accuracy_reward(" <think> 40 + 2 </think> <answer> 42 </answer>", "42") == 1.0
    assert accuracy_reward(" <think> 40 + 2 = 42 </think> <answer> 41 </answer>", "42") == 0.0
    assert accuracy_reward("<answer>42</answer>", "42") == 1.0


def test_accuracy_boxed_inside_tag():
    assert accuracy_reward(tagged("\\boxed{7}"), "7") == 1.0
    assert accuracy_reward(tagged("The answer is $\\boxed{\\frac{7}{2}}$."), "3.5") == 1.0
    assert accuracy_reward(tagged("\\boxed{8}"), "7") == 0.0


def test_accuracy_missing_tags():
    free = " <think> 6 * 7 </think> 6 * 7 = 42"
    assert accuracy_reward(free, "42", require_tag=True) == 0.0
    assert accuracy_reward(free, "42", require_tag=False) == 1.0       # last number in free text
    assert accuracy_reward(" 40 then 42 then 41", "42", require_tag=False) == 0.0
    assert accuracy_reward(" so it is \\boxed{42}. Done", "42", require_tag=False) == 1.0
    # With require_tag=False the tag still wins when present.
    assert accuracy_reward(" 42 <answer> 41 </answer>", "42", require_tag=False) == 0.0


def test_accuracy_two_answer_blocks_is_wrong():
    hedge = " <think> t </think> <answer> 42 </answer> <answer> 42 </answer>"
    assert accuracy_reward(hedge, "42") == 0.0
    assert accuracy_reward(hedge, "42", require_tag=False) == 0.0


def test_accuracy_latex_fraction_vs_decimal():
    assert accuracy_reward(tagged("\\frac{3}{8}"), "0.375") == 1.0
    assert accuracy_reward(tagged("0.375"), "\\frac{3}{8}") == 1.0
    assert accuracy_reward(tagged("0.38"), "\\frac{3}{8}") == 0.0


def test_unparseable_gold_raises():
    with pytest.raises(ValueError, match="gold"):
        accuracy_reward(tagged("4"), "  ")
    with pytest.raises(GoldError, match="could not be parsed by math-verify"):
        accuracy(tagged("4"), "", RewardConfig(verifier="math"))


# -- score / combine ---------------------------------------------------------------------------

def test_score_and_combine():
    cfg = RewardConfig(accuracy_weight=0.8, format_weight=0.2, require_answer_tag=True, verifier="math")
    assert score(tagged("4"), "4", cfg) == (1.0, 1.0)
    assert score(tagged("5"), "4", cfg) == (0.0, 1.0)
    assert score(" 4", "4", cfg) == (0.0, 0.0)
    free = RewardConfig(require_answer_tag=False, verifier="math")
    assert score(" 4", "4", free) == (1.0, 0.0)
    assert score(tagged("5") + " 4", "4", free) == (0.0, 0.0)
    assert combine(1.0, 1.0, cfg) == pytest.approx(1.0)
    assert combine(0.0, 1.0, cfg) == pytest.approx(0.2)
    assert combine(1.0, 0.0, cfg) == pytest.approx(0.8)
    assert combine(1.0, 1.0, RewardConfig(accuracy_weight=2.0, format_weight=0.0)) == 2.0
    assert combine(0.0, 0.0, cfg) == 0.0


def test_doctests():
    result = doctest.testmod(rewards, raise_on_error=False)
    assert result.attempted > 10
    assert result.failed == 0


def test_works_outside_the_main_thread():
    # math-verify's signal.alarm timeouts would raise here; rlsys turns them off.
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(score(tagged("\\frac{1}{2}"), "0.5",
                                                                 RewardConfig(verifier="math"))))
    t.start()
    t.join()
    assert out == [(1.0, 1.0)]


# -- verifier dispatch -------------------------------------------------------------------------

def rg_gold(task, answer, **metadata):
    return json.dumps({"question": "q", "answer": answer, "metadata": {"source_dataset": task, **metadata}})


COUNTDOWN = rg_gold("countdown", "42*(30 - 4 - 23)", numbers=[30, 23, 42, 4], target=126,
                    expression="42*(30 - 4 - 23)")
RG = RewardConfig(verifier="reasoning_gym", require_answer_tag=True)


def test_auto_verifier_must_be_resolved_before_scoring():
    with pytest.raises(ValueError, match="reward.verifier=auto must be resolved"):
        score(tagged("4"), "4", RewardConfig(verifier="auto"))


def test_math_verifier_is_the_default_behaviour():
    assert score(tagged("\\frac{1}{2}"), "0.5", RewardConfig(verifier="math")) == (1.0, 1.0)


@pytest.mark.parametrize("answer, expected", [
    ("42*(30 - 4 - 23)", 1.0),        # the stored expression
    ("(30 - 23 - 4) * 42", 1.0),      # another expression reaching 126 with all the numbers
    ("42*30 - 4 - 23", 0.0),          # right numbers, wrong value: reasoning-gym's 0.05 counts as 0
    ("126", 0.0),                     # not using the numbers
    ("__import__('os').getpid()", 0.0),  # never handed to sympy's parse_expr
    ("42**30**4**23", 0.0),           # power towers neither
])
def test_reasoning_gym_countdown(answer, expected):
    assert score(tagged(answer), COUNTDOWN, RG) == (expected, 1.0)


def test_reasoning_gym_missing_or_hedged_answer_scores_zero():
    assert score(" <think> x </think>", COUNTDOWN, RG) == (0.0, 0.0)
    assert score(" <answer> 1 </answer> <answer> 2 </answer>", COUNTDOWN, RG)[0] == 0.0
    # without a required tag the whole completion is the answer (and free text is no expression)
    free = RewardConfig(verifier="reasoning_gym", require_answer_tag=False)
    assert score(" (30 - 23 - 4) * 42", COUNTDOWN, free) == (1.0, 0.0)
    assert score(" so it is (30 - 23 - 4) * 42", COUNTDOWN, free) == (0.0, 0.0)


def test_reasoning_gym_partial_credit_is_zero():
    gold = rg_gold("basic_arithmetic", "3", expression="2 - -1")
    assert score(tagged("3"), gold, RG)[0] == 1.0
    assert score(tagged("12345"), gold, RG)[0] == 0.0  # the library's default scorer gives 0.2 here


def test_reasoning_gym_gold_must_be_an_entry():
    with pytest.raises(ValueError, match="reasoning-gym entry"):
        score(tagged("3"), "3", RG)


def test_reasoning_gym_scorer_uses_the_options_the_data_was_made_with():
    # puzzle24's scorer checks the numbers against its config's value range (default 1..10)
    gold = json.loads(rg_gold("puzzle24", "4*6*1*1", numbers=[4, 6, 1, 1]))
    assert score(tagged("4*6*1*1"), json.dumps(gold), RG)[0] == 1.0
    gold["rlsys_config"] = {"min_value": 2, "max_value": 10}
    assert score(tagged("4*6*1*1"), json.dumps(gold), RG)[0] == 0.0


# -- number verifier (arithmetic: the answer's last number literal, never an evaluated expression)

NUMBER = RewardConfig(verifier="number", require_answer_tag=False)


def test_a_restated_problem_scores_with_math_verify_and_not_with_the_number_verifier():
    """The reward hack a 10-step run found (docs/learning.md): restate "27 + 40 =" in the think block and
    math-verify evaluates the expression to the gold; the number verifier reads 40."""
    hack = "<think> 27 + 40 =</think>"
    assert accuracy(hack, "67", RewardConfig(verifier="math", require_answer_tag=False)) == 1.0
    assert accuracy(hack, "67", NUMBER) == 0.0
    assert accuracy(tagged("27 + 40"), "67", RewardConfig(verifier="math")) == 1.0  # the tag does not stop it
    assert accuracy(tagged("27 + 40"), "67", NUMBER) == 0.0


@pytest.mark.parametrize("completion, gold, expected", [
    ("<think> 27 + 40 = 67 </think>", "67", 1.0),
    ("<think> 27 + 40 = 67 </think> The answer is 67.", "67", 1.0),
    ("<think> 40 - 53 </think> <answer> -13 </answer>", "-13", 1.0),
    ("<think> 40 - 53 </think> <answer> \u221213 </answer>", "-13", 1.0),  # the Unicode minus
    ("<think> 40 - 53 </think> <answer> 13 </answer>", "-13", 0.0),
    ("<think> t </think> <answer> 67.00 </answer>", "67", 1.0),
    ("<think> t </think> <answer> 1,067 </answer>", "1067", 1.0),
    ("<think> t </think> <answer> 0.5 </answer>", "1/2", None),  # a fraction gold is not a plain number
    ("<think> 67 is it </think> <answer> 68 </answer>", "67", 0.0),  # the block wins over the think text
    ("<think> t </think> <answer> 67 </answer> <answer> 67 </answer>", "67", 0.0),  # hedging
    ("<think> no number at all", "67", 0.0),
    ("<think> 27 + 40 = 6", "67", 0.0),  # cut off mid-number: 6
])
def test_number_verifier(completion, gold, expected):
    if expected is None:
        with pytest.raises(GoldError, match="not a plain number"):
            accuracy(completion, gold, NUMBER)
    else:
        assert accuracy(completion, gold, NUMBER) == expected


def test_number_verifier_with_the_tag_required_reads_only_the_block():
    strict = RewardConfig(verifier="number", require_answer_tag=True)
    assert accuracy("<think> 27 + 40 = 67 </think>", "67", strict) == 0.0
    assert accuracy(tagged("67"), "67", strict) == 1.0


def test_answer_keys_are_what_the_verifier_reads():
    """cons@k votes on these: the number, not the whole completion (two texts with the same final
    number are one vote)."""
    assert rewards.answer_key("<think> 27 + 40 = 67 </think> 67", NUMBER) == "67"
    assert rewards.answer_key("<think> add them: 67.0 </think>", NUMBER) == "67"
    assert rewards.answer_key("<think> nothing </think>", NUMBER) is None
    assert rewards.answer_key(tagged("41"), NUMBER) == "41"
    assert rewards.answer_key(tagged("1") + tagged("2"), NUMBER) is None
    math_free = RewardConfig(verifier="math", require_answer_tag=False)
    assert rewards.answer_key("<think> 6 * 7 </think> so 42", math_free) == "42"
    assert rewards.answer_key(tagged("\\frac12"), RewardConfig(verifier="math")) == "\\frac12"
    assert rewards.answer_key("<think> 42 </think>", RewardConfig(verifier="math", require_answer_tag=True)) is None


def test_check_golds_names_the_first_bad_number_gold():
    check_golds(["67", "-13", "1,067", "0.5"], "number", "sums")
    with pytest.raises(ValueError, match=r"sums: the gold answer of row 1 \('27 \+ 40'\) cannot be used by the number "
                                         r"verifier: is not a plain number"):
        check_golds(["67", "27 + 40", "x"], "number", "sums")


def test_unknown_verifier():
    cfg = RewardConfig(verifier="math")
    cfg.verifier = "sql"
    with pytest.raises(ValueError, match="must be one of .*got .sql."):
        score(tagged("4"), "4", cfg)


def test_partial_format_mode_is_a_ladder_to_the_full_format():
    cfg = RewardConfig(verifier="math", format_mode="partial", require_answer_tag=False)
    assert score("<think> 2 + 3 = 5 </think> <answer> 5 </answer>", "5", cfg) == (1.0, 1.0)
    assert score("<think> 2 + 3 = 5 </think> so 5", "5", cfg) == (1.0, 0.5)
    assert score("<think> 2 + 3 = 5, so 5", "5", cfg) == (1.0, 0.0)
    strict = RewardConfig(verifier="math", format_mode="strict", require_answer_tag=False)
    assert score("<think> 2 + 3 = 5 </think> so 5", "5", strict) == (1.0, 0.0)


# -- accuracy / format_score: the two halves the reward worker runs apart -----------------------

def test_accuracy_and_format_score_are_the_halves_of_score():
    math = RewardConfig(verifier="math", require_answer_tag=True)
    assert accuracy(tagged("4"), "4", math) == 1.0
    assert accuracy(tagged("5"), "4", math) == 0.0
    assert accuracy(" 4", "4", math) == 0.0
    assert accuracy(" 4", "4", RewardConfig(verifier="math", require_answer_tag=False)) == 1.0
    assert accuracy(tagged("(30 - 23 - 4) * 42"), COUNTDOWN, RG) == 1.0
    # The format score needs neither the gold nor the verifier.
    assert format_score(tagged("5"), RewardConfig(verifier="auto", format_mode="strict")) == 1.0
    assert format_score(" <think> a </think> 5", RewardConfig(format_mode="strict")) == 0.0
    assert format_score(" <think> a </think> 5", RewardConfig(format_mode="partial")) == 0.5
    with pytest.raises(ValueError, match="format_mode.*fancy"):
        format_score(tagged("5"), RewardConfig(format_mode="fancy"))
    with pytest.raises(ValueError, match="auto must be resolved"):
        accuracy(tagged("4"), "4", RewardConfig(verifier="auto"))


# -- check_golds --------------------------------------------------------------------------------

def test_check_golds_names_the_first_bad_math_gold():
    golds = ["42", "\\frac{1}{2}", "  ", "x = 3", "", "  "]
    with pytest.raises(ValueError) as info:
        check_golds(golds, "math", "training data /data/train.jsonl")
    assert str(info.value) == (
        "training data /data/train.jsonl: the gold answer of row 2 ('  ') cannot be used by the math verifier: "
        "could not be parsed by math-verify (it finds no expression in it); 3 rows are bad in all (fix the data)")


def test_check_golds_names_the_first_bad_reasoning_gym_gold():
    golds = [COUNTDOWN, COUNTDOWN, "126", json.dumps({"metadata": {}}),
             json.dumps({"metadata": {"source_dataset": ""}})]
    with pytest.raises(ValueError) as info:
        check_golds(golds, "reasoning_gym", "eval set countdown/test")
    assert str(info.value) == (
        "eval set countdown/test: the gold answer of row 2 ('126') cannot be used by the reasoning_gym verifier: "
        "is not a reasoning-gym entry as JSON (with metadata.source_dataset): TypeError: 'int' object is not "
        "subscriptable; 3 rows are bad in all (fix the data)")
    with pytest.raises(ValueError, match=r"row 0 \('\{\"metadata\": \{\}\}'\).*KeyError: 'source_dataset'; "
                                         r"1 row is bad"):
        check_golds(golds[3:4], "reasoning_gym", "x")
    with pytest.raises(ValueError, match=r"row 0 .*has metadata.source_dataset '', not a task name"):
        check_golds(golds[4:], "reasoning_gym", "x")


def test_check_golds_value_is_cut_to_200_chars_and_non_strings_are_bad():
    with pytest.raises(ValueError) as info:
        check_golds([COUNTDOWN, "{" * 500], "reasoning_gym", "data")
    assert f"row 1 ('{'{' * 200}')" in str(info.value)
    with pytest.raises(ValueError, match=r"row 1 \(42\) cannot be used by the math verifier: is a int, not a string; "
                                         r"1 row is bad"):
        check_golds(["1", 42], "math", "data")


def test_check_golds_refuses_an_unresolved_verifier():
    with pytest.raises(ValueError, match="auto must be resolved"):
        check_golds(["1"], "auto", "data")
    with pytest.raises(ValueError, match="'sql'"):
        check_golds(["1"], "sql", "data")


def test_check_golds_accepts_the_real_golds():
    check_golds([a for _, a in datasets.load("gsm8k", "test")], "math", "gsm8k/test")
    check_golds([a for _, a in datasets.load("math500", "test")], "math", "math500/test")
    check_golds([a for _, a in datasets.load("countdown", "test", limit=20)], "reasoning_gym", "countdown/test")
    check_golds([], "math", "nothing")


def test_check_golds_in_processes_finds_the_same():
    # What a large data set gets (CHECK_PARALLEL_MIN distinct golds or more): the same check,
    # spread over spawned processes.
    golds = [str(i) for i in range(40)] + [" ", "7", "", "\\frac{1}{2}"]
    with pytest.raises(ValueError) as info:
        check_golds(golds, "math", "data", processes=2)
    assert str(info.value) == (
        "data: the gold answer of row 40 (' ') cannot be used by the math verifier: could not be parsed by "
        "math-verify (it finds no expression in it); 2 rows are bad in all (fix the data)")
    check_golds(golds[:40], "math", "data", processes=2)
