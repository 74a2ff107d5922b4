"""Prompts: a registry dataset (data.name, see rlsys.data.datasets) or a jsonl/parquet file read with
pyarrow, wrapped in a template, streamed resumably.

Templates:
- r1_zero: the DeepSeek-R1-Zero text template, word for word, for base models: it constrains
  only the structure (<think> then <answer>), never the content.
- chat: the tokenizer's chat template with the question as the user turn (instruct models).
- none: the raw prompt field (toy tasks).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from rlsys.config import DataConfig
from rlsys.data import datasets
from rlsys.data.files import DataError, read_rows, resolve_data_path
from rlsys.types import PromptRequest

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)

@dataclass
class Prompt:
    index: int
    """Row of the dataset it came from."""
    text: str
    """The templated prompt."""
    ids: list[int] | None
    """Its token ids, exactly what the engine sees (None when the stream has no tokenizer)."""
    question: str
    answer: str

    def request(self, group: int) -> PromptRequest:
        assert self.ids is not None, "a prompt stream without a tokenizer has no token ids to generate from"
        return group, self.index, self.ids, self.answer


def load_rows(cfg: DataConfig, skipped: list[str] | None = None) -> list[tuple[str, str]]:
    """(question, answer) for every row; a missing or empty field stops with file, row and field.

    With ``cfg.name`` set: the rows of that registry dataset's ``cfg.split`` (rlsys.data.datasets);
    ``cfg.path`` and the field names are then not used. With data.on_bad_row=skip a bad row (a
    broken JSON line, a missing or empty field) is left out and described in ``skipped``.
    """
    if cfg.name:
        try:
            return datasets.load(cfg.name, cfg.split)
        except ValueError as e:
            raise DataError(f"data.name={cfg.name} data.split={cfg.split}: {e}") from e
    return read_rows(resolve_data_path(cfg.path), cfg.prompt_field, cfg.answer_field, cfg.on_bad_row == "skip",
                     skipped)


def apply_template(question: str, cfg: DataConfig, tokenizer=None, shots: list[tuple[str, str]] = ()) -> str:
    """The text the generators see: the question in cfg.template, then cfg.prefill. shots:
    worked (question, response) examples shown first (few-shot prompting, R1's way of making
    cold-start data; rlsys.loops.sample): earlier chat turns, or for the text templates each
    example templated and answered, a blank line apart. A response is the whole answer, prefill
    included."""
    if cfg.template == "r1_zero":
        text = R1_ZERO_TEMPLATE.format(prompt=question.strip().rstrip("."))
    elif cfg.template == "chat":
        assert tokenizer is not None, "the chat template needs the tokenizer"
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        turns = [m for q, r in shots for m in ({"role": "user", "content": q}, {"role": "assistant", "content": r})]
        return tokenizer.apply_chat_template(system + turns + [{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True) + cfg.prefill
    elif cfg.template == "none":
        text = question
    else:
        raise DataError(f"unknown data.template {cfg.template!r}")
    bare = dataclasses.replace(cfg, prefill="")
    return "".join(apply_template(q, bare) + " " + r + "\n\n" for q, r in shots) + text + cfg.prefill


def load_shots(path: str | Path) -> list[tuple[str, str]]:
    """Few-shot examples: a .jsonl file of {"prompt": question, "response": whole answer} rows."""
    path, shots = resolve_data_path(path, "few-shot file {path}"), []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e})") from e
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) and row[f].strip()
                                                for f in ("prompt", "response")):
            raise DataError(f"{path}:{n}: a few-shot example needs non-empty string fields prompt and response")
        shots.append((row["prompt"], row["response"]))
    if not shots:
        raise DataError(f"{path}: no few-shot examples")
    return shots


def encode(texts: list[str], tokenizer, template: str) -> list[list[int]]:
    """Token ids of templated prompts, computed once here and given to the engine as they are (it
    never re-tokenises). A chat template writes its own special tokens, BOS included, into the
    text, so none are added (adding them would double BOS with Llama-style tokenizers); the other
    templates get what the tokenizer adds to any plain text by default (BOS for Llama, nothing
    for Qwen)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=template != "chat")["input_ids"]


class PromptStream:
    """Endless shuffled epochs over the rows; `state()`/`load_state()` make it resumable."""

    def __init__(self, cfg: DataConfig, seed: int, tokenizer=None):
        self.cfg = cfg
        self.skipped: list[str] = []  # data.on_bad_row=skip: what was left out, and why
        self.rows = load_rows(cfg, self.skipped)
        self.texts = [apply_template(q, cfg, tokenizer) for q, _ in self.rows]
        self.ids = encode(self.texts, tokenizer, cfg.template) if tokenizer is not None else None
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self.order = self._order(0)

    def drop(self, indices: set[int], why: list[str]) -> None:
        """Leave these rows out (data.on_bad_row=skip), before the first `next`."""
        assert self.epoch == 0 and self.cursor == 0, "rows can only be dropped before the stream starts"
        keep = [i for i in range(len(self.rows)) if i not in indices]
        if not keep:
            raise DataError(f"every row was left out as bad: {why[:3]}")
        self.rows = [self.rows[i] for i in keep]
        self.texts = [self.texts[i] for i in keep]
        self.ids = None if self.ids is None else [self.ids[i] for i in keep]
        self.skipped += why
        self.order = self._order(0)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, n: int | None = None) -> list[Prompt]:
        n = n or self.cfg.prompts_per_step
        out = []
        while len(out) < n:
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._order(self.epoch)
            i = self.order[self.cursor]
            self.cursor += 1
            out.append(Prompt(index=i, text=self.texts[i], ids=None if self.ids is None else self.ids[i],
                              question=self.rows[i][0], answer=self.rows[i][1]))
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "rows": len(self.rows)}

    def load_state(self, state: dict) -> None:
        if state.get("rows", len(self.rows)) != len(self.rows):
            raise DataError(f"the prompt stream was saved over {state['rows']} rows and the data now has "
                            f"{len(self.rows)}: the data changed since the checkpoint, its position means nothing")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = self._order(self.epoch)


def check_prompt_lengths(ids: list[list[int]], budget: int, what: str, skip: bool = False) -> dict[int, str]:
    """Stop before any actor starts if a prompt leaves no room to answer: vLLM would refuse it
    mid-run. Counts the very token ids the engine is given. budget = generator.max_model_len -
    generator.max_tokens. skip: return {row: why} for the rows over budget instead of stopping."""
    over = {}
    for i, row in enumerate(ids):
        if len(row) > budget:
            why = (f"{what}: row {i} is {len(row)} tokens once templated, over generator.max_model_len - "
                   f"generator.max_tokens = {budget}")
            if not skip:
                raise DataError(f"{why}; raise generator.max_model_len or drop the row")
            over[i] = why
    return over
