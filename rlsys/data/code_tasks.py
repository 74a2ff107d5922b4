"""Programming problems with hidden tests, generated: small Python functions from a one-sentence
specification, at three levels of difficulty (`code_functions`, rlsys's own, as `digit_add` is).

Each problem is drawn from a family (the table below): a specification with random constants, a
reference implementation and an input generator. The question states the function's name and
signature, what it returns and one example; the gold (rlsys.sandbox.judge) holds five hidden tests,
each `assert name(args) == expected` with `expected` from the reference, on inputs other than the
example's. Level 1: one operation on one value; level 2: a pass over a list or string; level 3: a
loop with a condition or two (primes, FizzBuzz, run-length encoding).

Splits: a fixed fifth of the functions (by a hash of name and specification: `held_out`) are
test-only, the rest train-only, so no held-out function is ever trained on, whatever its examples
(the same families and skills, other constants, and some families seen only in test); "train" draws
with seed 1, "test" with seed 10**9.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Callable

SEEDS = {"train": 1, "test": 10**9}
HIDDEN_TESTS = 5


@dataclass(frozen=True)
class Problem:
    name: str
    args: str  # the signature's parameters, e.g. "xs"
    does: str  # "returns ...", one sentence
    ref: Callable[..., Any]
    inputs: Callable[[random.Random], tuple]
    level: int


def _ints(r: random.Random, n: tuple[int, int] = (0, 8), lo: int = -20, hi: int = 50) -> list[int]:
    return [r.randint(lo, hi) for _ in range(r.randint(*n))]


def _word(r: random.Random, letters: str = "abcdefghijklmnopqrstuvwxyz", n: tuple[int, int] = (0, 9)) -> str:
    return "".join(r.choice(letters) for _ in range(r.randint(*n)))


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _rle(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        out.append(f"{s[i]}{j - i}")
        i = j
    return "".join(out)


def _families(r: random.Random) -> list[Problem]:
    """Every family once, its constants drawn from r."""
    k, m = r.randint(2, 19), r.randint(2, 9)
    a, b = r.sample([2, 3, 4, 5, 7], 2)
    c = r.choice("aeiou")
    return [
        Problem(f"add_{k}", "x", f"returns x plus {k}", lambda x: x + k, lambda g: (g.randint(-100, 100),), 1),
        Problem(f"times_{m}", "x", f"returns x multiplied by {m}", lambda x: x * m, lambda g: (g.randint(-50, 50),), 1),
        Problem("larger", "a, b", "returns the larger of the two numbers a and b", max,
                lambda g: (g.randint(-99, 99), g.randint(-99, 99)), 1),
        Problem("is_even", "n", "returns True if the integer n is even and False otherwise", lambda n: n % 2 == 0,
                lambda g: (g.randint(-99, 99),), 1),
        Problem(f"repeat_{m}", "s", f"returns the string s repeated {m} times", lambda s: s * m,
                lambda g: (_word(g, n=(0, 4)),), 1),
        Problem("sum_even", "xs", "returns the sum of the even numbers in the list xs",
                lambda xs: sum(x for x in xs if x % 2 == 0), lambda g: (_ints(g),), 2),
        Problem(f"above_{k}", "xs", f"returns the list of the numbers in xs greater than {k}, in their order",
                lambda xs: [x for x in xs if x > k], lambda g: (_ints(g),), 2),
        Problem("reverse", "s", "returns the string s reversed", lambda s: s[::-1], lambda g: (_word(g),), 2),
        Problem("squares", "xs", "returns the list of the squares of the numbers in xs",
                lambda xs: [x * x for x in xs], lambda g: (_ints(g, lo=-9, hi=9),), 2),
        Problem(f"count_{c}", "s", f"returns how many times the letter '{c}' occurs in the string s",
                lambda s: s.count(c), lambda g: (_word(g, "abcdeiou", (0, 12)),), 2),
        Problem("is_prime", "n", "returns True if n is a prime number and False otherwise", _is_prime,
                lambda g: (g.randint(-5, 200),), 3),
        Problem(f"fizzbuzz_{a}_{b}", "n", f"returns 'FizzBuzz' if n is divisible by both {a} and {b}, 'Fizz' if "
                f"only by {a}, 'Buzz' if only by {b}, and otherwise n as a string",
                lambda n: "FizzBuzz" if n % a == 0 and n % b == 0 else "Fizz" if n % a == 0 else "Buzz"
                if n % b == 0 else str(n), lambda g: (g.choice([a * b * g.randint(1, 5), a * g.randint(1, 20),
                                                               b * g.randint(1, 20), g.randint(1, 100)]),), 3),
        Problem("second_largest", "xs", "returns the second largest distinct value in the list xs, or None "
                "if it has fewer than two distinct values",
                lambda xs: sorted(set(xs))[-2] if len(set(xs)) >= 2 else None, lambda g: (_ints(g, (1, 8), 0, 9),), 3),
        Problem("run_length", "s", "returns the run-length encoding of the string s: each run of a repeated "
                "character as the character followed by the run's length (so 'aab' gives 'a2b1')",
                _rle, lambda g: (_word(g, "ab", (0, 8)),), 3),
        Problem("digit_sum", "n", "returns the sum of the decimal digits of the non-negative integer n",
                lambda n: sum(map(int, str(n))), lambda g: (g.randint(0, 10**6),), 3),
    ]


def _call(name: str, args: tuple) -> str:
    return f"{name}({', '.join(map(repr, args))})"


def make(problem: Problem, r: random.Random) -> tuple[str, str, int]:
    """(question, gold, level): one example in the question, HIDDEN_TESTS other inputs in the gold."""
    seen, cases = set(), []
    for _ in range(200):
        args = problem.inputs(r)
        if repr(args) not in seen:
            seen.add(repr(args))
            cases.append(args)
        if len(cases) == HIDDEN_TESTS + 1:
            break
    example, hidden = cases[0], cases[1:]
    question = (f"Write a Python function `{problem.name}({problem.args})` that {problem.does}. "
                f"For example, {_call(problem.name, example)} returns {problem.ref(*example)!r}.")
    gold = json.dumps({"tests": [f"assert {_call(problem.name, a)} == {problem.ref(*a)!r}" for a in hidden]})
    return question, gold, problem.level


def held_out(problem: Problem) -> bool:
    """Whether a function (its name and specification) belongs to the test split: a fixed fifth of them
    by hash, so no held-out function is ever trained on, whatever the examples."""
    digest = hashlib.sha256(f"{problem.name}({problem.args}): {problem.does}".encode()).hexdigest()
    return int(digest[:8], 16) % 5 == 0


def rows(split: str, n: int, levels: tuple[int, ...] = (1, 2, 3)) -> list[tuple[str, str]]:
    """n (question, gold) problems of the split, families in turn, restricted to `levels`."""
    if split not in SEEDS:
        raise ValueError(f"code_functions has splits {tuple(SEEDS)}, not {split!r}")
    r, out, seen = random.Random(SEEDS[split]), [], set()
    for _ in range(50 * n + 100):
        for problem in _families(r):
            if problem.level not in levels or held_out(problem) != (split == "test"):
                continue
            question, gold, _ = make(problem, r)
            if question in seen:
                continue
            seen.add(question)
            out.append((question, gold))
            if len(out) == n:
                return out
    raise ValueError(f"code_functions: only {len(out)} distinct {split} problems at levels {levels}, {n} asked")
