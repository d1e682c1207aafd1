"""Read training records from JSONL: `{"text": ...}` (the seed format) or `{"prompt": ..., "completion": ...}`."""
from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """A bad input record; the message names the file and line."""


def parse_record(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: field 'text' must be a string, got {type(obj['text']).__name__}")
        return {"text": obj["text"]}
    if "prompt" in obj or "completion" in obj:
        for field in ("prompt", "completion"):
            if not isinstance(obj.get(field), str):
                got = "nothing" if field not in obj else type(obj[field]).__name__
                raise DataError(f"{where}: field '{field}' must be a string, got {got}")
        if not obj["completion"]:
            raise DataError(f"{where}: field 'completion' is empty; nothing to learn from this record")
        return {"prompt": obj["prompt"], "completion": obj["completion"]}
    raise DataError(f"{where}: expected a field 'text', or 'prompt' and 'completion'; got fields {sorted(obj)}")


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            records.append(parse_record(obj, where))
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records
