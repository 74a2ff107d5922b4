"""One worker of the sandbox pool: runs a program against some of its tests in a fresh sandbox.

Plain class, no Ray here (rlsys.cluster.remote makes it an actor; rlsys.cluster.sandboxes pools
them). Each call is one sandboxed run (rlsys.sandbox.execute: a fresh process tree with its own
namespaces, limits and wall deadline), so nothing a program does outlives its call and the worker
itself never runs model-written code. Calls may come from several threads at once
(reward.code.runs_per_worker): the sandbox gives each concurrent run its own uid.
"""

from __future__ import annotations

import dataclasses

from rlsys.config import CodeConfig
from rlsys.sandbox.execute import Execution
from rlsys.sandbox.judge import limits_of, open_sandbox, run_tests

STDERR_CHARS = 2000
"""What a result keeps of the run's stderr (the reason of a crash is in its last line)."""


@dataclasses.dataclass(frozen=True)
class TestsRun:
    """The tests of one call that reported: test index (in the problem's list) -> (passed, what failed),
    and how the run ended (stdout dropped: the results are read from it)."""
    results: dict[int, tuple[bool, str]]
    execution: Execution


class SandboxWorker:
    def __init__(self, code_cfg: CodeConfig):
        self.sandbox = open_sandbox(code_cfg)  # probed: a machine that cannot stops here
        self.limits = limits_of(code_cfg)

    def run(self, code: str, tests: list[str], indices: list[int], setup: str = "") -> TestsRun:
        """Runs `code` then `tests` (the problem's tests numbered `indices`) in one sandbox."""
        results, run = run_tests(self.sandbox, code, tests, setup, self.limits)
        return TestsRun({indices[i]: r for i, r in results.items()},
                        dataclasses.replace(run, stdout="", stderr=run.stderr[-STDERR_CHARS:]))

    def close(self) -> None:
        self.sandbox.close()
