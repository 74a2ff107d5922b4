"""Rule-based rewards for R1-Zero style RL: pure functions of (completion, gold answer).

The R1-Zero template (see R1.md) asks the model to reason inside ``<think> ... </think>`` and to
give its answer inside ``<answer> ... </answer>``. The *completion* is the model's text after the
prompt; the prompt ends with ``Assistant:``, so a completion usually starts with a space.

Two rule rewards, both binary as in the paper (no neural reward model):

- **format** (:func:`format_reward`): 1.0 iff the completion is, up to surrounding whitespace,
  exactly one ``<think>...</think>`` block followed (whitespace allowed between) by exactly one
  ``<answer>...</answer>`` block whose content is not blank, and nothing else: no text before
  ``<think>``, none after ``</answer>``, no extra or nested tags of either kind. An empty
  ``<think></think>`` is allowed (the paper constrains the structure, not the content).
- **accuracy** (:func:`accuracy_reward`): 1.0 iff math-verify finds the extracted answer equal to
  the gold answer. What counts as the answer (:func:`extract_answer`):

  * exactly one ``<answer>...</answer>`` block: its content (stripped);
  * two or more ``<answer>`` (or ``</answer>``) tags: no answer, accuracy 0. Several answers are
    hedging, and rewarding "any of them is right" would teach the model to list candidates;
  * no complete block: no answer when ``require_tag`` (R1's "answer in a specified format");
    otherwise the whole completion, where math-verify looks for the final answer in free text
    (the last ``\\boxed{}``, else the last LaTeX expression or number).

  The content of the answer block and the gold are bare answers ("0.5", "1/2", "\\frac12",
  "\\boxed{12}", "x = 3"). math-verify only reads LaTeX between delimiters, so a bare answer
  without ``$``/``\\boxed``/``\\(``/``\\[`` is parsed as ``$answer$``, falling back to the plain
  text when that yields no expression (e.g. "**42**"). Equivalent forms then match: "0.5", "1/2",
  "\\frac{1}{2}", "\\boxed{\\frac12}"; "3" and "3.0"; "12" and "\\boxed{12}"; "3" and "x = 3".
  Numbers compare after rounding to 6 decimals (math-verify's default). A gold that parses to
  nothing at all (e.g. empty) raises :class:`GoldError`: a data bug must not look like a 0 reward.

With ``RewardConfig.verifier="number"`` (arithmetic tasks whose gold is a plain number) the
answer is the *last number literal* of the extracted answer (:func:`last_number`: the block's
content, or the whole completion when there is no block and the tag is not required), equal to the
gold as an exact rational ("67", "67.0" and "+67" all match 67). math-verify is the wrong judge
there: it evaluates expressions, so a completion that merely restates the problem
("<think> 27 + 40 =</think>") parses as 27 + 40 and matches the gold 67; a policy learns that in
ten steps (docs/learning.md). With the number verifier the
restatement's last number is 40, wrong. The one restatement it still credits is one whose last
operand equals the answer (80 - 40 = 40), too rare to learn from.

With ``RewardConfig.verifier="reasoning_gym"`` (reasoning-gym tasks: countdown, puzzle24, ...)
the gold is the task entry as JSON (see rlsys.data.datasets) and accuracy is 1.0 iff the task's own
scorer gives the extracted answer full marks (:func:`reasoning_gym_accuracy`; its partial credit
counts as 0, so the reward stays binary). ``verifier="auto"`` is resolved from the data before
any scoring (rlsys.data.datasets.resolve_verifier); :func:`accuracy` refuses it.

The two halves are separate on purpose: :func:`accuracy` (``cfg.verifier``, the part that can
hang or crash on model text) and :func:`format_score` (``cfg.format_mode``, a regex that cannot).
:class:`rlsys.actors.reward_worker.RewardWorker` runs only the accuracy check in a killable child and the
format score in its own process, so a verifier that times out, raises or crashes costs that
sample its accuracy and nothing else. The reward is ``accuracy_weight * accuracy +
format_weight * format`` (:func:`combine`); :func:`score` gives both halves in-process.

A gold answer the verifier cannot use is a data bug, never a 0 reward: it raises
:class:`GoldError` (a ValueError) here, and :func:`check_golds` finds every such gold of a data
set up front, before training starts.

Where rlsys differs from the paper: the paper gives no exact rule text, so the rules above are
this module's reading of it. The weighted sum of the two rewards (defaults 0.8 / 0.2) is ours;
the paper only says both rule rewards are used. ``require_answer_tag=True`` is R1's strict
reading; ``False`` (an rlsys option) also credits a right final answer written without the tags,
for models that cannot produce them yet, while the format reward still pays for the tags.

math-verify runs with its own timeouts off (``parsing_timeout=None``, ``timeout_seconds=None``):
they use ``signal.alarm``, which fails outside the main thread. A verifier that hangs is the
caller's to stop: :class:`rlsys.actors.reward_worker.RewardWorker` runs :func:`accuracy` in a child
process that it kills after ``RewardConfig.timeout_s``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from rlsys.math.golds import GoldError

if TYPE_CHECKING:  # only for annotations: this module stays importable without omegaconf
    from rlsys.config import RewardConfig

__all__ = ["format_reward", "partial_format_reward", "extract_answer", "accuracy_reward", "reasoning_gym_accuracy",
           "number_accuracy", "last_number", "answer_key", "accuracy", "format_score", "score", "combine", "check_golds",
           "GoldError", "VERIFIERS", "FORMAT_MODES"]

VERIFIERS = ("math", "number", "reasoning_gym", "code")
"""RewardConfig.verifier values that :func:`accuracy` scores with ("auto" is resolved before)."""
FORMAT_MODES = ("strict", "partial")
"""RewardConfig.format_mode values: :func:`format_reward` | :func:`partial_format_reward`."""


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_FORMAT_RE = re.compile(r"\A\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*\Z", re.DOTALL)
# Already delimited for math-verify: unescaped $, \boxed, \( or \[ (an escaped \$ is a dollar sign).
_DELIMITED_RE = re.compile(r"(?<!\\)\$|\\boxed|\\\(|\\\[")


def format_reward(completion: str) -> float:
    """1.0 iff the completion is exactly ``<think>...</think>`` then ``<answer>...</answer>``.

    Whitespace is allowed around and between the blocks; the answer must not be blank; each of
    the four tags must appear exactly once.

    >>> format_reward(" <think> 2 + 2 = 4 </think> <answer> 4 </answer>")
    1.0
    >>> format_reward("\\n<think>\\nadd\\n</think>\\n<answer>4</answer>\\n")
    1.0
    >>> format_reward(" <answer> 4 </answer>")  # no think block
    0.0
    >>> format_reward(" <think> 4 </think>")  # no answer block
    0.0
    >>> format_reward(" <think> a </think> <answer> 4 </answer> more")  # text after </answer>
    0.0
    >>> format_reward(" So: <think> a </think> <answer> 4 </answer>")  # text before <think>
    0.0
    >>> format_reward(" <think> a </think> <answer> 4 </answer> <answer> 5 </answer>")
    0.0
    >>> format_reward(" <think> a <think> b </think> </think> <answer> 4 </answer>")  # nested
    0.0
    >>> format_reward(" <answer> 4 </answer> <think> a </think>")  # wrong order
    0.0
    >>> format_reward(" <think> a </think> <answer>  </answer>")  # blank answer
    0.0
    """
    if any(completion.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
        return 0.0
    m = _FORMAT_RE.match(completion)
    if m is None or not m.group(2).strip():
        return 0.0
    return 1.0


def partial_format_reward(completion: str) -> float:
    """A ladder to the R1 format: 1.0 for the full format (as format_reward), 0.5 for a
    well-formed think block alone (starts with <think>, one <think> and one </think>), else 0.

    >>> partial_format_reward(" <think> 2 + 2 = 4 </think> <answer> 4 </answer>")
    1.0
    >>> partial_format_reward("<think> 2 + 2 = 4 </think> so it is 4")
    0.5
    >>> partial_format_reward("<think> 2 + 2 = 4, so 4")
    0.0
    """
    if format_reward(completion) == 1.0:
        return 1.0
    think_ok = (completion.lstrip().startswith(THINK_OPEN) and completion.count(THINK_OPEN) == 1
                and completion.count(THINK_CLOSE) == 1)
    return 0.5 if think_ok else 0.0


def _answer_block(completion: str) -> tuple[str, str | None]:
    """("one", content) | ("many", None) | ("none", None)."""
    n_open, n_close = completion.count(ANSWER_OPEN), completion.count(ANSWER_CLOSE)
    if n_open >= 2 or n_close >= 2:
        return "many", None
    if n_open == 1 and n_close == 1:
        start = completion.index(ANSWER_OPEN) + len(ANSWER_OPEN)
        end = completion.index(ANSWER_CLOSE)
        if start <= end:
            return "one", completion[start:end].strip()
    return "none", None


def extract_answer(completion: str, require_tag: bool) -> str | None:
    """The answer to check: the stripped content of the single ``<answer>`` block.

    None if there are two or more ``<answer>`` (or ``</answer>``) tags: several answers are
    hedging and score as wrong. Without a complete block: None when ``require_tag``, else the
    whole completion (math-verify then finds the final answer in the free text).

    >>> extract_answer(" <think> 6 * 7 </think> <answer> 42 </answer>", require_tag=True)
    '42'
    >>> extract_answer(" <answer> 41 </answer> <answer> 42 </answer>", require_tag=False) is None
    True
    >>> extract_answer(" 6 * 7 = 42", require_tag=True) is None
    True
    >>> extract_answer(" 6 * 7 = 42", require_tag=False)
    ' 6 * 7 = 42'
    """
    kind, content = _answer_block(completion)
    if kind == "one":
        return content
    if kind == "many" or require_tag:
        return None
    return completion


@functools.lru_cache(maxsize=1)
def _math_verify() -> Any:
    """Imports math_verify once (lazily: format_reward and the worker's parent never need it)."""
    import math_verify

    class _DropDisabledTimeoutWarning(logging.Filter):
        # Disabling math-verify's signal-based timeouts is deliberate here (see the module doc).
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith("Timeout is disabled")

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
    return math_verify


def _parse(text: str) -> list:
    return _math_verify().parse(text, parsing_timeout=None)


def _parse_bare(text: str) -> list:
    """Parses a bare answer ("0.5", "\\frac12", "x = 3", "\\boxed{12}") with math-verify."""
    text = text.strip()
    if not text:
        return []
    if _DELIMITED_RE.search(text):
        return _parse(text)
    wrapped = _parse(f"${text}$")
    if any(not isinstance(x, str) for x in wrapped):
        return wrapped
    return _parse(text) or wrapped


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    parsed = _parse_bare(gold)
    if not parsed:
        raise GoldError("math", gold, "could not be parsed by math-verify (it finds no expression in it)")
    return parsed


def accuracy_reward(completion: str, gold: str, require_tag: bool = True) -> float:
    """1.0 iff math-verify says the extracted answer (see :func:`extract_answer`) equals ``gold``.

    >>> accuracy_reward(" <think> half </think> <answer> 0.5 </answer>", "\\\\frac{1}{2}")
    1.0
    >>> accuracy_reward(" <think> half </think> <answer> \\\\boxed{\\\\frac12} </answer>", "1/2")
    1.0
    >>> accuracy_reward(" <think> 6 * 7 </think> <answer> 42 </answer>", "42")
    1.0
    >>> accuracy_reward(" <think> 6 * 7 </think> <answer> 41 </answer>", "42")
    0.0
    >>> accuracy_reward(" <answer> 41 </answer> <answer> 42 </answer>", "42")  # hedging
    0.0
    >>> accuracy_reward(" 6 * 7 = 42", "42")  # no tag, required
    0.0
    >>> accuracy_reward(" 6 * 7 = 42", "42", require_tag=False)  # free text: last number
    1.0
    """
    gold_parsed = _parse_gold(gold)
    kind, content = _answer_block(completion)
    if kind == "one":
        target = _parse_bare(content)
    elif kind == "none" and not require_tag:
        target = _parse(completion)
    else:
        return 0.0
    if not target:
        return 0.0
    ok = _math_verify().verify(gold_parsed, target, timeout_seconds=None)
    return 1.0 if ok else 0.0


# A number literal: optional sign (the Unicode minus too), digits with optional thousands commas
# ("1,234"), optional decimals. No exponents or fractions: the tasks it judges write neither.
_NUMBER_RE = re.compile(r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _canonical(literal: str) -> str:
    """"+1,234.50" -> "1234.5", "\u22127" -> "-7", "67.0" -> "67"."""
    value = Decimal(literal.replace(",", "").replace("\u2212", "-").lstrip("+"))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def last_number(text: str) -> str | None:
    """The last number literal of ``text``, canonical (see :data:`_NUMBER_RE`), or None.

    >>> last_number(" <think> 27 + 40 = 67 </think> so 67.")
    '67'
    >>> last_number(" <think> 27 + 40 =")  # a restated problem: its last operand
    '40'
    >>> last_number("40 - 53 = \u221213"), last_number("about 1,234.50"), last_number("no digits")
    ('-13', '1234.5', None)
    """
    found = _NUMBER_RE.findall(text)
    return _canonical(found[-1]) if found else None


@functools.lru_cache(maxsize=4096)
def _gold_number(gold: str) -> Fraction:
    if not _NUMBER_RE.fullmatch(gold.strip()):
        raise GoldError("number", gold, "is not a plain number (the number verifier compares number literals; "
                        "use verifier math for expressions)")
    return Fraction(_canonical(gold.strip()))


def number_accuracy(completion: str, gold: str, require_tag: bool = True) -> float:
    """1.0 iff the last number literal of the extracted answer (see :func:`extract_answer`) equals
    ``gold``, a plain number, exactly.

    >>> number_accuracy(" <think> 27 + 40 </think> <answer> 67 </answer>", "67")
    1.0
    >>> number_accuracy(" <think> add </think> <answer> 27 + 40 = 67.0 </answer>", "67")
    1.0
    >>> number_accuracy(" <think> add </think> <answer> 27 + 40 </answer>", "67")  # not evaluated
    0.0
    >>> number_accuracy("<think> 27 + 40 =</think>", "67", require_tag=False)  # restated, as math-verify credits
    0.0
    >>> number_accuracy("<think> 27 + 40 = 67</think>", "67", require_tag=False)
    1.0
    >>> number_accuracy("<think> 27 + 40 = 67</think>", "67", require_tag=True)
    0.0
    """
    want = _gold_number(gold)
    answer = extract_answer(completion, require_tag)
    got = last_number(answer) if answer is not None else None
    return 1.0 if got is not None and Fraction(got) == want else 0.0


_ARITHMETIC_RE = re.compile(r"[0-9\s+\-*/()]+")
# Tasks whose scorer runs sympy.parse_expr (which evaluates Python) on the answer: only plain
# arithmetic reaches it; anything else (names, "**" towers, "=") is wrong anyway.
_EXPRESSION_TASKS = frozenset({"countdown", "puzzle24"})


def _code_gold(gold: str) -> dict:
    from rlsys.sandbox.judge import parse_gold

    return parse_gold(gold)


@functools.lru_cache(maxsize=64)
def _reasoning_gym_scorer(task: str, config_json: str | None) -> Any:
    """The task's ``score_answer(answer, entry)``, built with the options the data was made with."""
    import reasoning_gym  # lazily: only runs on reasoning-gym data pay for the import

    if config_json is None:
        return reasoning_gym.get_score_answer_fn(task)
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise ValueError(f"reasoning-gym has no task {task!r}")
    dataset_cls, config_cls = DATASETS[task]
    return dataset_cls(config=config_cls(**json.loads(config_json))).score_answer


@functools.lru_cache(maxsize=4096)
def _parse_entry(gold: str) -> tuple[dict, str, str | None]:
    try:
        entry = json.loads(gold)
        task = entry["metadata"]["source_dataset"]
    except (ValueError, TypeError, KeyError) as e:
        raise GoldError("reasoning_gym", gold, "is not a reasoning-gym entry as JSON (with "
                        f"metadata.source_dataset): {type(e).__name__}: {e}") from None
    if not isinstance(task, str) or not task:
        raise GoldError("reasoning_gym", gold, f"has metadata.source_dataset {task!r}, not a task name")
    config = entry.pop("rlsys_config", None)
    return entry, task, (json.dumps(config, sort_keys=True) if config else None)


def reasoning_gym_accuracy(completion: str, gold: str, require_tag: bool = True) -> float:
    """1.0 iff the task's own scorer gives the extracted answer (see :func:`extract_answer`) full
    marks; ``gold`` is the task entry (question, answer, metadata) as JSON, see rlsys.data.datasets.

    reasoning-gym scorers give partial credit (e.g. countdown 0.05 for a wrong expression that
    uses the right numbers, 0.01 for one that does not parse); the R1 accuracy reward is binary,
    so anything below 1 is 0.

    >>> import json
    >>> entry = {"question": "Make 24 using 4, 6, 1, 1.", "answer": "4*6*1*1",
    ...          "metadata": {"source_dataset": "puzzle24", "numbers": [4, 6, 1, 1]}}
    >>> reasoning_gym_accuracy(" <think> t </think> <answer> (4*6)/(1*1) </answer>", json.dumps(entry))
    1.0
    >>> reasoning_gym_accuracy(" <think> t </think> <answer> 4+6+1+1 </answer>", json.dumps(entry))
    0.0
    """
    entry, task, config_json = _parse_entry(gold)
    answer = extract_answer(completion, require_tag)
    if answer is None:
        return 0.0
    if task in _EXPRESSION_TASKS and ("**" in answer or not _ARITHMETIC_RE.fullmatch(answer)):
        return 0.0
    value = _reasoning_gym_scorer(task, config_json)(answer, entry)
    return 1.0 if value is not None and float(value) >= 1.0 else 0.0


def accuracy(completion: str, gold: str, cfg: RewardConfig) -> float:
    """Accuracy (0.0 or 1.0) of one completion with ``cfg.require_answer_tag``, judged by
    ``cfg.verifier``: math (:func:`accuracy_reward`) | number (:func:`number_accuracy`) | reasoning_gym
    (:func:`reasoning_gym_accuracy`). "auto" must have been resolved before (by the caller, with
    rlsys.data.datasets.resolve_verifier): it raises ValueError here. This is the part that may hang
    or crash on model text; :class:`rlsys.actors.reward_worker.RewardWorker` runs it in a killable child.

    >>> from rlsys.config import RewardConfig
    >>> accuracy(" <think> 1 + 2 </think> <answer> 3 </answer>", "3", RewardConfig(verifier="math"))
    1.0
    >>> accuracy(" <think> 1 + 2 </think> 3", "3", RewardConfig(verifier="math", require_answer_tag=False))
    1.0
    >>> accuracy(" <think> 1 + 2 </think> 3", "3", RewardConfig(verifier="math", require_answer_tag=True))
    0.0
    >>> accuracy(" <answer> 3 </answer>", "3", RewardConfig(verifier="auto"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: reward.verifier=auto must be resolved to math, number or reasoning_gym before scoring ...
    """
    verifier = cfg.verifier
    if verifier == "math":
        return accuracy_reward(completion, gold, cfg.require_answer_tag)
    if verifier == "number":
        return number_accuracy(completion, gold, cfg.require_answer_tag)
    if verifier == "reasoning_gym":
        return reasoning_gym_accuracy(completion, gold, cfg.require_answer_tag)
    if verifier == "code":  # runs the program: in the sandbox this process holds (rlsys.sandbox.judge)
        from rlsys.sandbox.judge import code_accuracy

        return code_accuracy(completion, gold, cfg)
    raise ValueError(_bad_verifier(verifier))


def _bad_verifier(verifier: str) -> str:
    if verifier == "auto":
        return ("reward.verifier=auto must be resolved to math, number or reasoning_gym before scoring "
                "(rlsys.data.datasets.resolve_verifier)")
    return f"reward.verifier must be one of {', '.join(VERIFIERS)}, got {verifier!r}"


def answer_key(completion: str, cfg: RewardConfig) -> str | None:
    """The answer the verifier reads in ``completion``, as a key for majority voting (cons@k), or
    None: number: its last number literal (canonical); math: the <answer> block's content, or in
    free text the final answer math-verify extracts; reasoning_gym: :func:`extract_answer`.

    >>> from rlsys.config import RewardConfig
    >>> answer_key("<think> 27 + 40 = 67 </think> 67.0", RewardConfig(verifier="number"))
    '67'
    >>> answer_key("<think> 1 + 2 </think> so 3", RewardConfig(verifier="math"))
    '3'
    >>> answer_key("<think> t </think> <answer> 3 </answer>", RewardConfig(verifier="math"))
    '3'
    """
    if cfg.verifier == "code":  # the program, whitespace at line ends aside
        from rlsys.sandbox.judge import extract_code

        code = extract_code(completion)
        return None if code is None else "\n".join(line.rstrip() for line in code.strip().splitlines())
    answer = extract_answer(completion, cfg.require_answer_tag)
    if answer is None:
        return None
    if cfg.verifier == "number":
        return last_number(answer)
    if cfg.verifier == "math" and _answer_block(completion)[0] == "none":
        found = [x for x in _parse(completion) if isinstance(x, str)]
        return found[-1] if found else None
    return answer


def format_score(completion: str, cfg: RewardConfig) -> float:
    """Format reward of one completion by ``cfg.format_mode``: strict (:func:`format_reward`,
    R1's 0 or 1) | partial (:func:`partial_format_reward`, 0, 0.5 or 1). It does not depend on
    the gold or the verifier, so a verifier's timeout or crash never costs it.

    >>> from rlsys.config import RewardConfig
    >>> format_score(" <think> 1 + 2 </think> <answer> 3 </answer>", RewardConfig(format_mode="strict"))
    1.0
    >>> format_score(" <think> 1 + 2 </think> 3", RewardConfig(format_mode="strict"))
    0.0
    >>> format_score(" <think> 1 + 2 </think> 3", RewardConfig(format_mode="partial"))
    0.5
    """
    mode = cfg.format_mode
    if mode == "strict":
        return format_reward(completion)
    if mode == "partial":
        return partial_format_reward(completion)
    raise ValueError(f"reward.format_mode must be one of {FORMAT_MODES}, got {mode!r}")


def score(completion: str, gold: str, cfg: RewardConfig) -> tuple[float, float]:
    """(:func:`accuracy`, :func:`format_score`) of one completion, both in this process and with
    no timeout (tests, benchmarks); training scores through rlsys.actors.reward_worker.RewardWorker.

    >>> from rlsys.config import RewardConfig
    >>> score(" <think> 1 + 2 </think> <answer> 3 </answer>", "3", RewardConfig(verifier="math"))
    (1.0, 1.0)
    >>> score(" <think> 1 + 2 </think> 3", "3", RewardConfig(verifier="math", require_answer_tag=False))
    (1.0, 0.0)
    """
    return accuracy(completion, gold, cfg), format_score(completion, cfg)


def combine(accuracy: float, fmt: float, cfg: RewardConfig, language: float | None = None) -> float:
    """``cfg.accuracy_weight * accuracy + cfg.format_weight * fmt``, plus
    ``cfg.language_weight * language`` when the language-consistency reward is on (R1).

    >>> from rlsys.config import RewardConfig
    >>> combine(1.0, 1.0, RewardConfig(accuracy_weight=0.8, format_weight=0.2))
    1.0
    >>> combine(0.0, 1.0, RewardConfig(accuracy_weight=1.0, format_weight=0.5))
    0.5
    >>> combine(1.0, 1.0, RewardConfig(accuracy_weight=0.8, format_weight=0.2, language_weight=0.1), language=0.5)
    1.05
    """
    reward = cfg.accuracy_weight * accuracy + cfg.format_weight * fmt
    return reward + cfg.language_weight * language if language is not None else reward


def language_score(completion: str, cfg: RewardConfig) -> float | None:
    """Language consistency of one completion when reward.language_weight > 0, else None (not computed)."""
    from rlsys.math.language import language_consistency

    return language_consistency(completion, cfg.language) if cfg.language_weight > 0 else None


CHECK_PARALLEL_MIN = 1000
"""From this many distinct golds on, :func:`check_golds` spreads the math check over processes.
latex2sympy's ANTLR parser (pure Python, full-context prediction on LaTeX) takes about 1 ms a
gold, up to ~80 ms for tuples and intervals: MATH train (7498 rows, 2897 distinct golds) takes
~10 s in one process, ~5.5 s in two."""
CHECK_MAX_PROCESSES = 8


def check_golds(golds: list[str], verifier: str, what: str, *, processes: int | None = None) -> None:
    """Raises ValueError if the verifier cannot use some gold answer of ``golds``, naming
    ``what`` (e.g. "training data /path/file.jsonl"), the first bad row (index, value, why) and
    how many rows are bad in all. The check is the one scoring makes, so a data set that passes
    never raises :class:`GoldError` while scoring: math: math-verify parses the gold (as
    :func:`accuracy_reward` does); number: the gold is a plain number literal; reasoning_gym: the
    gold is a reasoning-gym entry as JSON with metadata.source_dataset.

    Equal golds are checked once (GSM8K train: 7473 rows, 866 distinct golds, ~0.5 s). With
    :data:`CHECK_PARALLEL_MIN` or more distinct math golds the parsing runs in ``processes``
    spawned processes (default: the usable CPUs, at most :data:`CHECK_MAX_PROCESSES`), so a
    script that calls this at import time needs the ``if __name__ == "__main__":`` guard;
    ``processes=1`` keeps it in this process.

    >>> check_golds(["42", "\\frac{1}{2}", "42"], "math", "toy data")
    >>> check_golds(["42", "", "7", " "], "math", "toy data")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: toy data: the gold answer of row 1 ('') cannot be used by the math verifier: ...; 2 rows are bad ...
    >>> entry = '{"metadata": {"source_dataset": "countdown"}}'
    >>> check_golds([entry, "126"], "reasoning_gym", "rg data")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: rg data: the gold answer of row 1 ('126') cannot be used by the reasoning_gym verifier: is not a ...
    """
    if verifier not in VERIFIERS:
        raise ValueError(_bad_verifier(verifier))
    distinct = list(dict.fromkeys(g for g in golds if isinstance(g, str)))
    if processes is None:
        processes = _usable_cpus() if verifier == "math" and len(distinct) >= CHECK_PARALLEL_MIN else 1
    processes = max(1, min(processes, CHECK_MAX_PROCESSES, len(distinct)))
    reasons = _gold_reasons(distinct, verifier) if processes == 1 else _gold_reasons_in(processes, distinct, verifier)
    bad_rows = [i for i, gold in enumerate(golds) if not isinstance(gold, str) or gold in reasons]
    if not bad_rows:
        return
    first = bad_rows[0]
    gold = golds[first]
    why = reasons[gold] if isinstance(gold, str) else f"is a {type(gold).__name__}, not a string"
    value = repr(gold[:200]) if isinstance(gold, str) else repr(gold)[:200]
    raise ValueError(f"{what}: the gold answer of row {first} ({value}) cannot be used by the "
                     f"{verifier} verifier: {why}; {len(bad_rows)} row{'s are' if len(bad_rows) > 1 else ' is'} "
                     f"bad in all (fix the data)")


def _gold_reasons(golds: list[str], verifier: str) -> dict[str, str]:
    """{gold: why} for each gold of ``golds`` that the verifier cannot use."""
    check = {"math": _parse_gold, "number": _gold_number, "reasoning_gym": _parse_entry, "code": _code_gold}[verifier]
    reasons = {}
    for gold in golds:
        try:
            check(gold)
        except GoldError as e:
            reasons[gold] = e.reason
    return reasons


def _gold_reasons_in(processes: int, golds: list[str], verifier: str) -> dict[str, str]:
    """:func:`_gold_reasons` spread over spawned processes (strided chunks: the slow golds, e.g.
    tuples, tend to sit together)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunks = [golds[i::processes] for i in range(processes)]
    reasons: dict[str, str] = {}
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for part in pool.map(_gold_reasons, chunks, [verifier] * processes):
            reasons.update(part)
    return reasons


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
