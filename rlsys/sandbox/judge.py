"""Judging a program a model wrote: its code from the completion, run against the problem's tests
in the sandbox, and how many passed.

The gold of a code problem is JSON: {"tests": ["assert f(1) == 2", ...], "setup": "optional code run
first"}: each test is a statement that raises when the program is wrong. The completion's code is the
content of its `<answer>` block (R1's template), with a Markdown code fence inside it unwrapped, or
else its last fenced block (```python ... ``` or ``` ... ```).

The harness (`harness`) runs in one sandboxed interpreter: the candidate's code in a namespace of
its own, then each test in turn, each printing one result line marked with a nonce the harness read
from stdin before the candidate ran (so that the candidate's own prints cannot pass for results).
A test that raises fails; one that never returns is cut by the sandbox's deadline, and the tests
that reported before it still count. Known limit: code that inspects the harness's frames could find
the nonce; nothing a model is rewarded for leads there, and the results print nothing else.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import re
import secrets

from rlsys.sandbox.execute import Execution, Limits, Sandbox
from rlsys.math.golds import GoldError

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str | None:
    """The program in a completion: the `<answer>` block's content (a fence inside unwrapped), else the
    last fenced block; None when there is neither (or more than one `<answer>` block: hedging)."""
    answers = _ANSWER.findall(completion)
    if len(answers) > 1:
        return None
    text = answers[0] if answers else None
    if text is not None:
        fences = _FENCE.findall(text)
        code = fences[-1][1] if fences else text
    else:
        fences = _FENCE.findall(completion)
        if not fences:
            return None
        code = fences[-1][1]
    code = code.strip("\n")
    return code if code.strip() else None


def parse_gold(gold: str) -> dict:
    """The problem's tests, checked: a malformed gold is a data bug (GoldError saying what is wrong)."""
    try:
        spec = json.loads(gold)
    except json.JSONDecodeError as e:
        raise GoldError("code", gold, f"is not JSON ({e})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("tests"), list) or not spec["tests"] \
            or not all(isinstance(t, str) and t.strip() for t in spec["tests"]):
        raise GoldError("code", gold, "has no non-empty list of test statements under 'tests'")
    if not isinstance(spec.get("setup", ""), str):
        raise GoldError("code", gold, "has a 'setup' that is not a string of code")
    for i, test in enumerate(spec["tests"]):
        try:
            compile(test, f"test_{i}", "exec")
        except SyntaxError as e:
            raise GoldError("code", gold, f"has test {i} that is not valid Python ({e.msg})") from None
    return spec


HARNESS = r'''
import sys
_nonce = sys.stdin.readline().strip()
_tests = __TESTS__
_space = {"__name__": "answer"}  # not "__main__": a main block of the answer does not run
def _report(i, ok, what=""):
    sys.stdout.write(f"{_nonce} {i} {int(ok)} {what[:200]!r}\n")
    sys.stdout.flush()
try:
    exec(compile(__SETUP__ + "\n" + __CODE__, "answer.py", "exec"), _space)
except BaseException as e:
    for i in range(len(_tests)):
        _report(i, False, "the program failed: " + type(e).__name__)
    raise SystemExit(0)
for i, test in enumerate(_tests):
    try:
        exec(compile(test, f"test_{i}", "exec"), _space)
        _report(i, True)
    except BaseException as e:
        _report(i, False, type(e).__name__ + (": " + str(e) if str(e) else ""))
'''


def harness(code: str, tests: list[str], setup: str = "") -> str:
    return (HARNESS.replace("__TESTS__", repr(list(tests))).replace("__SETUP__", repr(setup))
            .replace("__CODE__", repr(code)))


@dataclasses.dataclass(frozen=True)
class Judgement:
    passed: int
    total: int
    reason: str  # "" when every test passed; else the first failure, or how the run ended
    execution: Execution | None  # None when there was no code to run

    @property
    def fraction(self) -> float:
        return self.passed / self.total


def judge(sandbox: Sandbox, completion: str, gold: str, limits: Limits) -> Judgement:
    return judge_program(sandbox, extract_code(completion), gold, limits)


def judge_program(sandbox: Sandbox, code: str | None, gold: str, limits: Limits) -> Judgement:
    """`judge` of a program already taken from its completion (None: there was none)."""
    spec = parse_gold(gold)
    tests = spec["tests"]
    if code is None:
        return Judgement(0, len(tests), NO_CODE, None)
    results, run = run_tests(sandbox, code, tests, spec.get("setup", ""), limits)
    return tally(results, len(tests), run)


NO_CODE = "no code found (no <answer> block or fenced code)"


def run_tests(sandbox: Sandbox, code: str, tests: list[str], setup: str, limits: Limits
              ) -> tuple[dict[int, tuple[bool, str]], Execution]:
    """One sandboxed run of the program against `tests`: test index -> (passed, what failed), for the
    tests that reported before the run ended (a test that never returned, and those after it, are absent)."""
    nonce = secrets.token_hex(16)
    run = sandbox.python_source(harness(code, tests, setup), limits, stdin=(nonce + "\n").encode())
    results: dict[int, tuple[bool, str]] = {}
    for line in run.stdout.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[0] == nonce and parts[1].isdigit() and parts[2] in ("0", "1"):
            try:
                what = ast.literal_eval(parts[3])  # the harness writes it with repr
            except (ValueError, SyntaxError):
                what = parts[3]
            results.setdefault(int(parts[1]), (parts[2] == "1", str(what)))
    return results, run


def tally(results: dict[int, tuple[bool, str]], total: int, run: Execution | None, cut: str = "") -> Judgement:
    """The judgement from the tests' results (of one run, or of a program's tests split over several):
    passed, and the reason: the first failing test, and how the run ended when tests are missing.
    cut: how the run(s) that left tests unreported ended, when `run` is not the one that did."""
    passed = sum(ok for ok, _ in results.values())
    failures = [f"test {i}: {what}" for i, (ok, what) in sorted(results.items()) if not ok]
    ended = cut or (run.reason if run is not None else "")
    if passed == total:
        reason = ""
    elif failures:
        reason = failures[0]
    else:
        reason = ended or "the harness reported nothing"
    if len(results) < total and ended:
        reason = f"{reason}; run {ended}" if failures else ended
    return Judgement(passed, total, reason, run)


CACHE_SIZE = 4096  # judgements kept (a process's, or the sandbox pool's in a run), the oldest out first
_CACHE: dict[str, Judgement] = {}  # (program, tests, limits) -> judgement, oldest first
_SANDBOXES: dict = {}  # one per reward.code setting in a process (the reward worker's child holds one)
log = logging.getLogger(__name__)


def judgement_key(code: str | None, gold: str, limits: Limits) -> str:
    """What a judgement is cached by: the program, the problem's tests (its gold) and the limits."""
    return hashlib.sha256(json.dumps([code, gold, dataclasses.asdict(limits)]).encode()).hexdigest()


def open_sandbox(code_cfg, concurrency: int = 64) -> Sandbox:
    """A sandbox as reward.code says (probed: a machine that cannot give it stops here, naming why)."""
    if code_cfg.sandbox != "bwrap":
        log.warning("reward.code.sandbox=%s: model-written code runs with resource limits only, without "
                    "isolation (the host's files readable, its network reachable)", code_cfg.sandbox)
    return Sandbox(mode=code_cfg.sandbox, python=code_cfg.python, uid_base=code_cfg.uid_base, concurrency=concurrency)


def limits_of(code_cfg) -> Limits:
    return Limits(wall_s=code_cfg.wall_s, cpu_s=code_cfg.cpu_s, memory_mb=code_cfg.memory_mb,
                  processes=code_cfg.processes, output_bytes=code_cfg.output_kb << 10)


def sandbox_for(code_cfg) -> tuple[Sandbox, Limits]:
    """The process's sandbox for this reward.code setting (one each, kept), and the limits of a run."""
    key = (code_cfg.sandbox, code_cfg.python, code_cfg.uid_base)
    if key not in _SANDBOXES:
        _SANDBOXES[key] = open_sandbox(code_cfg)
    return _SANDBOXES[key], limits_of(code_cfg)


def code_accuracy(completion: str, gold: str, cfg) -> float:
    """reward.verifier=code: 1.0 when the answer's program passes every test (R1's rule), or with
    reward.code.partial the fraction passed. Judgements are cached in the process by (program, tests,
    limits), so a group's identical programs run once. A program that fails is logged with the reason (at
    warning level when the sandbox had to stop it: deadline, output cap, a signal)."""
    sandbox, limits = sandbox_for(cfg.code)
    code = extract_code(completion)
    key = judgement_key(code, gold, limits)
    verdict = _CACHE.get(key)
    if verdict is None:  # the same program on the same tests (a group's identical answers) runs once
        verdict = judge_program(sandbox, code, gold, limits)
        _CACHE[key] = verdict
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
    if verdict.execution is not None and verdict.execution.verdict in ("timeout", "output_limit", "signal"):
        log.warning("code reward: the sandbox stopped a program (%s): %s", verdict.execution.reason, verdict.reason)
    elif verdict.reason:
        log.debug("code reward: %d/%d tests passed: %s", verdict.passed, verdict.total, verdict.reason)
    if cfg.code.partial:
        return verdict.fraction
    return float(verdict.passed == verdict.total)
