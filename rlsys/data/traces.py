"""Rejection sampling's rules: which sampled answers become SFT data, and the file they go to.

R1's stage 3 (R1.md) sampled its RL checkpoint many times per prompt and kept only correct,
readable answers. `rlsys sample` (rlsys.loops.sample) scores every sample with the training
rules (accuracy, format, and language consistency when asked), then `select` keeps, per prompt:
1. correct (accuracy 1), well formatted (format 1: R1's <think>...</think><answer>...</answer>)
   and finished (not cut at generator.max_tokens) answers, with --keep correct; every answer
   with --keep all;
2. language-consistent ones (rlsys.math.language: at least `min_language` of the reasoning's
   words in the target language), when a language is asked for;
3. no exact duplicate (the same text, whitespace aside) and no near duplicate (word 3-gram
   Jaccard similarity of at least `near_duplicate` with an answer already kept for that prompt);
4. at most `max_per_prompt`, the first ones sampled.
Every rejection is counted by its reason; the counts go into the file's metadata with the model,
the checkpoint step, the sampling settings and these filters (`write`, `provenance`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"rlsys"
"""The parquet schema metadata key holding the provenance JSON."""


@dataclass
class Candidate:
    """One sampled answer with its scores."""
    prompt_index: int
    question: str
    gold: str
    response: str
    """The completion as the generator wrote it (what follows the templated prompt)."""
    accuracy: float
    format: float
    finished: bool
    """False: cut at the token limit."""
    language: float | None = None
    """Language consistency in [0, 1]; None when no language was asked for."""
    tokens: int = 0


@dataclass
class Filters:
    keep: str = "correct"
    """correct: accuracy 1, format 1 and finished | all: every answer (duplicates and the cap still apply)."""
    language: str | None = None
    """A language code (rlsys.math.language.SCRIPTS): keep only answers whose reasoning is in it."""
    min_language: float = 0.95
    near_duplicate: float = 0.8
    """Word 3-gram Jaccard similarity from which two answers to one prompt count as the same; 1: exact only."""
    max_per_prompt: int = 4

    def check(self) -> None:
        """ConfigError (a ValueError) naming the command-line option."""
        from rlsys.config import ConfigError
        from rlsys.math.language import SCRIPTS

        if self.keep not in ("correct", "all"):
            raise ConfigError(f"--keep must be correct or all, got {self.keep!r}")
        if self.language is not None and self.language not in SCRIPTS:
            raise ConfigError(f"--language must be one of {sorted(SCRIPTS)}, got {self.language!r}")
        if not 0 < self.near_duplicate <= 1:
            raise ConfigError(f"--near-duplicate must be in (0, 1], got {self.near_duplicate}")
        if self.max_per_prompt < 1:
            raise ConfigError(f"--max-per-prompt must be >= 1, got {self.max_per_prompt}")


def shingles(text: str, n: int = 3) -> frozenset[tuple[str, ...]]:
    """The word n-grams of `text`, case and whitespace aside (a text shorter than n: itself).

    >>> sorted(shingles("a b  C d"))
    [('a', 'b', 'c'), ('b', 'c', 'd')]
    """
    words = text.lower().split()
    if len(words) < n:
        return frozenset([tuple(words)])
    return frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def rejection(c: Candidate, f: Filters) -> str | None:
    """Why `c` is not kept before deduplication, or None."""
    if f.keep == "correct":
        if c.accuracy != 1.0:
            return "incorrect"
        if c.format != 1.0:
            return "bad_format"
        if not c.finished:
            return "truncated"
    if f.language is not None and (c.language is None or c.language < f.min_language):
        return "language"
    return None


def select(candidates: list[Candidate], f: Filters) -> tuple[list[Candidate], dict[str, int]]:
    """The kept candidates (in sampling order) and the counts: candidates, kept, and one count
    per reason (incorrect, bad_format, truncated, language, duplicate, near_duplicate, over_cap)."""
    f.check()
    counts: Counter[str] = Counter(candidates=len(candidates))
    kept: list[Candidate] = []
    seen: dict[int, list[tuple[str, frozenset]]] = {}
    for c in candidates:
        reason = rejection(c, f)
        if reason is None:
            mine = seen.setdefault(c.prompt_index, [])
            text = " ".join(c.response.split())
            grams = shingles(c.response)
            if any(text == other for other, _ in mine):
                reason = "duplicate"
            elif any(jaccard(grams, other) >= f.near_duplicate for _, other in mine):
                reason = "near_duplicate"
            elif len(mine) >= f.max_per_prompt:
                reason = "over_cap"
            else:
                mine.append((text, grams))
                kept.append(c)
                continue
        counts[reason] += 1
    counts["kept"] = len(kept)
    counts["prompts_with_a_kept_answer"] = len({c.prompt_index for c in kept})
    return kept, dict(counts)


def write(kept: list[Candidate], out: Path, provenance: dict) -> Path:
    """An SFT dataset: columns prompt (the question), answer (the gold), response, and the scores;
    `provenance` as JSON in the schema metadata (read back with `read_provenance`)."""
    columns = {
        "prompt": [c.question for c in kept], "answer": [c.gold for c in kept],
        "response": [c.response for c in kept], "prompt_index": [c.prompt_index for c in kept],
        "accuracy": [c.accuracy for c in kept], "format": [c.format for c in kept],
        "language": [c.language for c in kept], "response_tokens": [c.tokens for c in kept],
    }
    schema = pa.schema([("prompt", pa.string()), ("answer", pa.string()), ("response", pa.string()),
                        ("prompt_index", pa.int64()), ("accuracy", pa.float64()), ("format", pa.float64()),
                        ("language", pa.float64()), ("response_tokens", pa.int64())],
                       metadata={METADATA_KEY: json.dumps(provenance).encode()})
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), out)
    return out


def read_provenance(path: Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{path}: no rlsys provenance in its metadata (not written by `rlsys sample`)")
    return json.loads(meta[METADATA_KEY])


def provenance(model: str, step: int | None, dataset: str, split: str | None, k: int, sampling: dict,
               f: Filters, counts: dict[str, int], seconds: float) -> dict:
    """What made the file: the model (and its checkpoint step), the questions, the sampling
    settings, the filters, the counts kept and dropped."""
    return {"model": model, "checkpoint_step": step, "dataset": dataset, "split": split, "k": k,
            "sampling": sampling, "filters": asdict(f), "counts": counts, "seconds": round(seconds, 1)}
