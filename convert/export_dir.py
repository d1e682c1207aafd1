"""An FT export folder read back as one object, and the checks that export, add, verify and triton share.

    read_export(OUT/2-gpu) -> Export(path, dims, tp, dtype, tasks, start_id, end_id, model_name, extra)
    check_files(export)     -> what FT would read but is missing, short or long, and files it would not read
    prefix_problems(...)    -> why a prefix file does not belong in this export (architecture, base model, shape, name)

`ft_export` (writes exports) and `ft_verify` (checks them) both build on this module and not on each other.
"""
from __future__ import annotations

import configparser
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..prefix.io import atomic_write_text
from ..prefix.shapes import PrefixShape
from . import ft_layout as L
from .ft_layout import FTDims

ARCHITECTURE = "gpt_neox"  # the only prefix architecture FT's gptneox backend serves


class ExportError(ValueError):
    """Bad input to an export command; the message names every problem and how to fix it."""

    @classmethod
    def of(cls, head: str, problems: list[str]) -> "ExportError":
        """One line for one problem, an indented list for several."""
        if len(problems) == 1:
            return cls(f"{head}: {problems[0]}")
        return cls(f"{head}:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Export:
    """An export folder as FT will read it: its dimensions, tensor-parallel size, data type and task slots."""

    path: Path
    dims: FTDims
    tp: int
    dtype: str  # "fp16" or "fp32" (weight_data_type)
    tasks: tuple[tuple[str, int], ...]  # (name, prompt length) in id order; removed tasks are placeholders
    start_id: int
    end_id: int
    model_name: str
    extra: dict = field(default_factory=dict, compare=False)  # the [prefixtune] section

    @property
    def live(self) -> dict[str, int]:
        """Task name -> id (prompt_learning_task_name_ids) of every task that is served."""
        return {n: i for i, (n, _) in enumerate(self.tasks) if not L.is_placeholder(n)}

    @property
    def prompt_lengths(self) -> dict[str, int]:
        """Task name -> prompt length of every task whose files FT reads."""
        return {n: p for n, p in self.tasks if p > 0 and not L.is_placeholder(n)}

    @property
    def itemsize(self) -> int:
        return np.dtype(L.NP_DTYPES[self.dtype]).itemsize

    @property
    def source_model(self) -> str | None:
        """The Hugging Face folder the base weights were exported from (as written by prefixtune)."""
        return self.extra.get("source_model")

    def with_tasks(self, tasks) -> "Export":
        return replace(self, tasks=tuple((n, int(p)) for n, p in tasks))

    def config_text(self) -> str:
        return L.config_ini(self.dims, model_name=self.model_name, start_id=self.start_id, end_id=self.end_id,
                            dtype=self.dtype, tasks=list(self.tasks), extra=self.extra)

    def tasks_json_text(self) -> str:
        return json.dumps(self.live, indent=2) + "\n"


def read_export(export_dir) -> Export:
    export_dir = Path(export_dir)
    ini = export_dir / "config.ini"
    if not ini.is_file():
        raise ExportError(f"{export_dir}: no config.ini; expected an export folder such as OUT/2-gpu "
                          "(written by `python -m prefixtune.convert ft`)")
    try:
        d, g, tasks, extra = L.read_config_ini(ini.read_text(encoding="utf-8"))
        dtype = g["weight_data_type"]
        tp_text = extra.get("tensor_para_size") or export_dir.name.split("-")[0]
        tp = int(tp_text)
        start, end, model_name = int(g["start_id"]), int(g["end_id"]), g["model_name"]
    except (configparser.Error, KeyError, ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{ini}: not a readable FT config.ini ({type(e).__name__}: {e}); re-export with "
                          "`python -m prefixtune.convert ft`") from None
    if dtype not in L.NP_DTYPES:
        raise ExportError(f"{ini}: weight_data_type is {dtype!r}, expected one of {', '.join(L.NP_DTYPES)}")
    if tp < 1:
        raise ExportError(f"{ini}: tensor_para_size is {tp}, expected >= 1")
    return Export(path=export_dir, dims=d, tp=tp, dtype=dtype, tasks=tuple(tasks), start_id=start, end_id=end,
                  model_name=model_name, extra=extra)


def write_index(ex: Export, dst: Path | None = None) -> None:
    """config.ini (what FT reads) and tasks.json (task name -> id, for clients), each written atomically."""
    dst = Path(dst or ex.path)
    atomic_write_text(dst / "config.ini", ex.config_text())
    atomic_write_text(dst / "tasks.json", ex.tasks_json_text())


def check_files(export) -> list[str]:
    """Compare the folder with what config.ini makes FT read: missing, short or long files, and extra files."""
    ex = export if isinstance(export, Export) else read_export(export)
    expected = L.expected_sizes(ex.dims, ex.tp, ex.prompt_lengths)
    problems = []
    for name, n in expected.items():
        path = ex.path / name
        if not path.is_file():
            problems.append(f"missing {name} ({n * ex.itemsize} bytes expected)")
        elif path.stat().st_size != n * ex.itemsize:
            problems.append(f"{name} has {path.stat().st_size} bytes, config.ini implies {n * ex.itemsize}")
    known = set(expected) | {"config.ini", "tasks.json"}
    problems += [f"extra file {p.name} (FT does not read it)" for p in sorted(ex.path.iterdir())
                 if p.name not in known and not p.name.startswith(".")]
    return problems


def _model_names(model: str) -> set[str]:
    """Names a model goes by: a folder's or hub id's last part, and the repo of a Hugging Face cache snapshot path
    (.../models--org--name/snapshots/<hash>)."""
    p = Path(str(model).rstrip("/\\"))
    names = {p.name}
    names.update(part.split("--")[-1] for part in p.parts if part.startswith("models--"))
    return {n.lower() for n in names if n}


def same_base(recorded: str, model: str) -> bool:
    """Whether a prefix header's base_model names `model`: prefix.io's rule (the same folder when both are existing
    paths, else the same string), and, since an export always reads a local folder while a prefix may record the
    hub id it was trained from, also the same name (folder or hub id's last part) when the two are not both paths."""
    from ..prefix.io import same_base_model

    if same_base_model(recorded, model):
        return True
    a, b = Path(recorded).expanduser(), Path(model).expanduser()
    if a.exists() and b.exists():
        return False
    return bool(_model_names(recorded) & _model_names(model))


def prefix_problems(path, shape: PrefixShape, meta: dict, dims: FTDims, *, base: str | None = None,
                    base_label: str = "--model", allow_other_base: bool = False) -> list[str]:
    """Why the prefix file `path` (header `meta`) cannot be served with a model of `dims`; empty when it can.

    `base`: the model the export is for (checked against the header's base_model unless `allow_other_base`).
    """
    problems = []
    # a flag (--model) is passed; a phrase ("the export's source model") is what the prefix must be trained on
    fix = (f"pass the {base_label} it was trained on" if base_label.startswith("-")
           else f"use a prefix trained on {base_label}, or export the model it was trained on")
    arch = meta.get("architecture")
    if arch != ARCHITECTURE:
        problems.append(f"{path}: header field architecture is {arch!r}, expected {ARCHITECTURE!r}: FT's GPT-NeoX "
                        "serves only prefixes trained on a GPT-NeoX model; train (or import with from-peft/from-rinna "
                        "--model) the prefix on the GPT-NeoX model you export")
    bad = dims.prefix_mismatches(shape)
    if bad:
        problems.append(f"{path} was trained on another model shape ({meta.get('base_model')}): " + "; ".join(bad) +
                        f"; {fix}")
    elif base is not None and not allow_other_base:
        recorded = meta.get("base_model")
        if recorded and not same_base(recorded, str(base)):
            problems.append(f"{path}: header field base_model is {recorded!r}, expected {base_label} {str(base)!r}: "
                            f"the prefix was trained on another model; {fix}, or pass --allow_other_base if you know "
                            "it fits this one")
    if shape.prefix_len < 1:
        problems.append(f"{path}: header field prefix_len is {shape.prefix_len}, expected >= 1 (an empty prefix "
                        "would be served as a removed task); pass a trained prefix")
    return problems


def writable_problem(folder: Path, flag: str) -> str | None:
    """Why files cannot be created in `folder` (or in the folders to be made for it); None when they can."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{flag} {folder}: {probe} is a file, not a folder; pass an {flag} folder that can be created"
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        return f"{flag} {folder}: {probe} is not writable; pass an {flag} you can write to or fix its permissions"
    return None
