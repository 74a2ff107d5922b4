"""The error of a gold answer that a verifier cannot use: a data bug, stopped before training, never a 0 reward.

Apart from rlsys.math.rewards so that every verifier (the rules there, the code judge in
rlsys.sandbox) raises the same one without importing the others; no torch, no omegaconf.
"""

from __future__ import annotations


class GoldError(ValueError):
    """A gold answer the verifier cannot use (a data bug, never a 0 reward).

    ``reason`` says why, without the gold itself; the message has both."""

    def __init__(self, verifier: str, gold: str, reason: str) -> None:
        super().__init__(f"{verifier} gold answer {gold[:200]!r} {reason}")
        self.verifier, self.gold, self.reason = verifier, gold, reason

    def __reduce__(self):  # picklable although __init__ takes three arguments
        return GoldError, (self.verifier, self.gold, self.reason)
