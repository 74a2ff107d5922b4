"""Question-and-answer rows from a .jsonl or .parquet file, and the error a bad data file stops with.

The bottom of rlsys/data: rlsys.data.datasets (the registry, `rlsys data prepare`) and
rlsys.data.prompts (templates, the prompt stream) both read files through it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.json as pa_json
import pyarrow.parquet as pq

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the repository (rlsys/data/files.py)


class DataError(ValueError):
    pass


def resolve_data_path(path: str | Path, what: str = "data.path={path}") -> Path:
    """A data file: as given (relative to the working directory), else in the rlsys source tree
    (so the embedded default and the shipped configs work from anywhere). `what` names the file
    in the error."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_absolute() and (SOURCE_ROOT / p).is_file():
        return SOURCE_ROOT / p
    raise DataError(f"{what.format(path=path)}: file not found (looked in {Path.cwd()} and {SOURCE_ROOT})")


def read_rows(path: Path, prompt_field: str, answer_field: str, skip: bool = False,
              skipped: list[str] | None = None) -> list[tuple[str, str]]:
    """(question, answer) for every row of the file; a missing or empty field stops with file, row
    and field. skip (data.on_bad_row=skip): a bad row (a broken JSON line, a missing or empty
    field) is left out and described in ``skipped`` instead."""
    if skipped is None:
        skipped = []

    def bad(message: str) -> None:
        if not skip:
            raise DataError(message)
        skipped.append(message)

    if path.suffix == ".parquet":
        table = pq.read_table(path)
        records = [dict(zip(table.column_names, r)) for r in zip(*(table.column(c).to_pylist()
                                                                   for c in table.column_names))]
        columns, where = table.column_names, [f"row {i}" for i in range(len(records))]
    elif path.suffix in (".jsonl", ".json") and not skip:
        try:
            table = pa_json.read_json(path)
        except Exception as e:  # pyarrow's message names the line; keep it, add the file
            raise DataError(f"{path}: cannot parse as JSON lines: {e}") from e
        records = table.to_pylist()
        columns, where = table.column_names, [f"row {i}" for i in range(len(records))]
    elif path.suffix in (".jsonl", ".json"):  # skip: line by line, so one broken line costs only itself
        records, columns, where = [], set(), []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad(f"{path}: line {number}: not JSON ({e})")
                continue
            if not isinstance(record, dict):
                bad(f"{path}: line {number}: not a JSON object")
                continue
            records.append(record)
            columns |= set(record)
            where.append(f"line {number}")
    else:
        raise DataError(f"data.path={path}: unsupported extension {path.suffix!r} (use .jsonl or .parquet)")
    for name, field in (("data.prompt_field", prompt_field), ("data.answer_field", answer_field)):
        if field not in columns:  # a whole column missing is a wrong field name, never skipped
            raise DataError(f"{path}: no column {field!r} ({name}); columns are {sorted(columns)}")
    rows = []
    for record, at in zip(records, where):
        q, a = record.get(prompt_field), record.get(answer_field)
        empty = [f for f, v in ((prompt_field, q), (answer_field, a)) if v is None or str(v).strip() == ""]
        if empty:
            bad(f"{path}: {at}: field {empty[0]!r} is missing or empty")
            continue
        rows.append((str(q), str(a)))
    if not rows:
        raise DataError(f"{path}: no rows" + (f" ({len(skipped)} skipped as bad)" if skipped else ""))
    return rows
