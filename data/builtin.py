"""The built-in demo data set: real English paragraphs from CPython's own documentation (`pydoc_data.topics`).

It ships with every Python, so the demo needs no download.
"""
from __future__ import annotations


def builtin_records(min_lines: int = 2) -> list[dict]:
    """Prose paragraphs of at least `min_lines` lines, as `{"text": ...}` records, in a fixed order."""
    from pydoc_data.topics import topics

    records = []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            lines = [line.strip() for line in para.strip().split("\n")]
            # Code listings, tables and headings teach nothing about line ends of prose: keep plain prose.
            if len(lines) < min_lines or any(not line or line[0] in "*=|>-+.:" for line in lines):
                continue
            if sum(c.isalpha() for c in para) < 0.6 * len(para):
                continue
            records.append({"text": "\n".join(lines)})
    return records
