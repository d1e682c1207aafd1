"""Task names: the one rule every entry point checks (training, the prefix file, the REPL, the server, export).

A task name travels far: it is a prefix file's header field, a file name in --prefix_dir, the `model` of an OpenAI
request, a Prometheus label, a log word and a FasterTransformer config.ini entry. So it is short and plain:
1-64 characters from letters, digits, '_', '-' and '.', starting with a letter, digit or '_' (never a hidden
file, '.' or '..'), and not `base`, which means "no prefix" everywhere. A server also reserves its base model's id; the
FasterTransformer export adds its own placeholder names (convert/ft_layout.py).
"""
from __future__ import annotations

import re
from pathlib import Path

BASE_TASK = "base"  # the task name that means "no prefix"
MAX_TASK_NAME = 64
_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.\-]{{0,{MAX_TASK_NAME - 1}}}")
RENAME = "python -m prefixtune.convert retask --prefix {path} --task NEW_NAME"  # the one rename command
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


def task_of(path, meta: dict) -> str:
    """The task a prefix file carries: its header field `task`; a file without one is known by its file name, as
    --prefix_dir names it (an empty field stays empty, and is refused)."""
    return meta["task"] if "task" in meta else Path(path).stem


def check_file_task(path, name) -> None:
    """Refuse a prefix file whose task name could never be chosen, naming the file and the rename command."""
    problem = task_name_problem(name)
    if problem:
        raise ValueError(f"{path}: {problem}; rename the task: {RENAME.format(path=path)}")


def load_prefixes(paths: list) -> list[tuple[str, tuple]]:
    """Read every prefix file before any model loads: [(path, (table, shape, meta))]. Refuses a task name the rule
    refuses, a file given twice and two files of one task."""
    from .io import load_prefix

    loaded, seen = [], {}
    for path in paths:
        table, shape, meta = load_prefix(path)
        name = task_of(path, meta)
        check_file_task(path, name)
        if name in seen:
            first = seen[name]
            if Path(first).resolve() == Path(path).resolve():
                raise ValueError(f"--prefix {path} is given twice; give it once")
            raise ValueError(f"--prefix {first} and {path} both carry task {name!r}; rename one with "
                             + RENAME.format(path=path))
        seen[name] = path
        loaded.append((path, (table, shape, meta)))
    return loaded


def rename_task(path, task: str, out=None, overwrite: bool = False) -> Path:
    """The one rename (`python -m prefixtune.convert retask`): rewrite a prefix file's header field `task`, every
    tensor and other field byte for byte the same; in place when `out` is None, atomically either way."""
    from safetensors import safe_open

    from .io import atomic_path, load_prefix, save_file

    src = Path(path)
    load_prefix(src)  # a readable prefix file
    check_task_name(task, "--task")
    dst = Path(out) if out is not None else src
    if dst.resolve() != src.resolve():
        if dst.is_dir():
            raise ValueError(f"--out {dst} is a folder, expected a .safetensors file path; pass a file name")
        if dst.exists() and not overwrite:
            raise ValueError(f"--out {dst} exists: pass --overwrite to replace it, or another --out")
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["task"] = task
    with atomic_path(dst) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return dst
