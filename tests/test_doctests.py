"""Every docstring example in rlsys/ runs and holds: each module that has examples is run with
doctest, and the count of examples attempted must equal the count of `>>>` lines in its source (a
module whose examples stopped being collected, or one moved away, fails here instead of passing
on zero examples)."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rlsys"
PROMPT = re.compile(r"^\s*>>> ", re.MULTILINE)
MODULES = sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
                 for p in PACKAGE.rglob("*.py") if PROMPT.search(p.read_text()))


def test_the_modules_with_examples_are_found():
    assert {"rlsys.math.grpo", "rlsys.math.rewards", "rlsys.cluster.sync", "rlsys.loops.train"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_every_example_of_the_module_runs_and_holds(name):
    module = importlib.import_module(name)
    expected = len(PROMPT.findall(Path(module.__file__).read_text()))
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (output above)"
    assert result.attempted == expected, f"{name}: {result.attempted} examples ran, {expected} written"
