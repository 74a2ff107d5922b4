"""The data that flows between the actor groups, with shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


PromptRequest = tuple[int, int, list[int], str]
"""What a generator is asked: (group, dataset row, prompt token ids, gold answer)."""


@dataclass
class Rollout:
    """One sampled answer to one prompt, as a generator produced it."""

    prompt_index: int
    """Dataset row of the question."""
    group: int
    """Which question of this step (the GRPO group it belongs to)."""
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    """The generator's log-prob of each sampled token."""
    text: str
    finish_reason: str
    """stop (EOS or a stop string) | length (hit max_tokens: truncated)."""
    weight_version: int
    """The weight version of the engine that produced it."""
    answer: str
    """The gold answer, carried along for the reward."""
    loss_mask: list[int] | None = None
    """Per response token: 1 sampled by the model, 0 a tool's output (generator.tools: no log-prob,
    left out of the loss). None: every token is the model's."""
    turns: int = 1
    """Turns the model took (generator.tools: 1 + the tool calls answered)."""
    tool_calls: int = 0
    tool_errors: int = 0
    """Tool calls made, and those whose tool failed (its error message was the output)."""
    tool_seconds: float = 0.0
    """Seconds its tool calls took (the python tool's: sandboxed runs)."""
    own_text: str | None = None
    """generator.tools: `text` without the tools' outputs, only what the model wrote. None: all of
    `text` is the model's."""

    def model_text(self) -> str:
        """What the rewards judge: the model's own text. A tool's output is not the model's answer
        (with it counted, a lenient reader paid a policy that called the calculator and stopped)."""
        return self.text if self.own_text is None else self.own_text


@dataclass
class RewardResult:
    """The score of one rollout, as a reward worker computed it."""

    reward: float
    accuracy: float
    format: float
    timed_out: bool
    """The verifier ran over reward.timeout_s: accuracy 0, the format score still paid."""
    error: str | None = None
    """The verifier raised on this sample or its process died (the exception's last line): accuracy
    0, the format score still paid, counted in the step's metrics."""
    language: float | None = None
    """Language consistency (rlsys.math.language) when reward.language_weight > 0, else None."""


@dataclass
class TrainBatch:
    """A rollout batch laid out for the learner: group by group, right-padded.

    Token t of row i is a response token iff loss_mask[i, t] == 1; its log-prob comes from
    the logits at position t - 1.
    """

    input_ids: torch.Tensor       # (B, L) long, prompt + response, pad after
    attention_mask: torch.Tensor  # (B, L) long
    loss_mask: torch.Tensor       # (B, L) float, 1 on response tokens
    gen_logprobs: torch.Tensor    # (B, L) float, generator log-probs on response tokens, 0 elsewhere
    advantages: torch.Tensor      # (B,) float
    rewards: torch.Tensor         # (B,) float
    staleness: torch.Tensor | None = None
    """(B,) long: learner weight version minus the version that sampled the row (0 = on-policy);
    None: all 0 (synchronous)."""
    prompt_lens: torch.Tensor | None = None
    """(B,) long: each row's prompt tokens (its first response token is at that position), so that
    the learner can share a prompt among the rows that have it (rlsys.math.prefix)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> "TrainBatch":
        """Rows `index`, trimmed to the longest remaining row (micro-batches carry no dead padding)."""
        rows = {k: None if getattr(self, k) is None else getattr(self, k)[index] for k in self.__dataclass_fields__}
        width = int(rows["attention_mask"].sum(dim=1).max())
        for k in ("input_ids", "attention_mask", "loss_mask", "gen_logprobs"):
            rows[k] = rows[k][:, :width]
        return TrainBatch(**rows)
