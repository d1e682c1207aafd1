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


def _utf16_without_bom(head: bytes) -> str | None:
    """'UTF-16LE' / 'UTF-16BE' when the file's first bytes are ASCII-range text in UTF-16 (a 0 byte after / before
    every character), as Windows tools write it without a byte-order mark; None otherwise. (UTF-8 text has no 0
    bytes, and json.loads would only say "Expecting value".)"""
    head = head[: len(head) // 2 * 2]
    if len(head) < 4 or b"\0" not in head:
        return None
    even, odd = head[0::2], head[1::2]
    if odd.count(0) == len(odd) and even.count(0) < len(even) // 2:
        return "UTF-16LE"
    if even.count(0) == len(even) and odd.count(0) < len(odd) // 2:
        return "UTF-16BE"
    return None


def iter_json_lines(path):
    """(line number, parsed JSON) for every non-blank line of a UTF-8 JSONL file; DataError naming file:line."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, expected a JSONL data file; pass the file inside it")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(64)
    boms = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
            (b"\xfe\xff", "UTF-16"))
    for bom, name in boms:
        if head.startswith(bom):
            raise DataError(f"{path}: the file is {name} text (it starts with a {name} byte-order mark); JSONL must "
                            f"be UTF-8: convert it, e.g. iconv -f {name} -t UTF-8 {path} > fixed.jsonl")
    name = _utf16_without_bom(head)
    if name:
        raise DataError(f"{path}: the file looks like {name} text without a byte-order mark (every other byte is 0); "
                        f"JSONL must be UTF-8: convert it, e.g. iconv -f {name} -t UTF-8 {path} > fixed.jsonl")
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "JSONL must be UTF-8: convert the file") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(path) -> list[dict]:
    records = [parse_record(obj, f"{path}:{n}") for n, obj in iter_json_lines(path)]
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records
