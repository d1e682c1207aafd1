"""Task names: the one rule every entry point checks (training, the prefix file, the REPL, the server, export).

A task name travels far: it is a prefix file's header field, a file name in --prefix_dir, the `model` of an OpenAI
request, a Prometheus label, a log word and a FasterTransformer config.ini entry. So it is short and plain:
1-64 characters from letters, digits, '_', '-' and '.', starting with a letter, digit or '_' (no hidden
files, no '..'), and not `base`, which means "no prefix" everywhere. A server also reserves its base model's id; the
FasterTransformer export adds its own placeholder names (convert/ft_layout.py).
"""
from __future__ import annotations

import re

BASE_TASK = "base"  # the task name that means "no prefix"
MAX_TASK_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
RULE = (f"1-{MAX_TASK_NAME} letters, digits, '_', '-' or '.', starting with a letter, digit or '_', "
        f"and not {BASE_TASK!r} (it means no prefix)")


def task_name_problem(name) -> str | None:
    """Why `name` cannot be a task name, or None when it can."""
    if not isinstance(name, str):
        return f"task name {name!r}: expected a string of {RULE}"
    if name.lower() == BASE_TASK:
        return f"task name {name!r} is reserved: it means no prefix"
    if not _NAME.fullmatch(name):
        return f"task name {name!r}: expected {RULE}"
    return None


def check_task_name(name, where: str = "") -> str:
    """`name` if it is a valid task name, else a ValueError that starts with `where` (a file, a flag)."""
    problem = task_name_problem(name)
    if problem:
        raise ValueError(f"{where}: {problem}" if where else problem)
    return name
