"""Export a GPT-NeoX model and prefixes to FasterTransformer files; add, replace, remove and list tasks.

Nothing is written until every input has been checked, the export is built in a temporary folder beside the
target and renamed into place, so a failure leaves OUT as it was.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..prefix.io import load_prefix
from ..prefix.tasks import task_of
from . import ft_layout as L
from .export_dir import Export, ExportError, check_files, prefix_problems, read_export, writable_problem, write_index
from .ft_layout import FTDims
from .hf_stream import iter_tensors

__all__ = ["ExportError", "Export", "read_export", "read_prefixes", "export", "list_tasks", "add_tasks",
           "remove_tasks"]

PLACEHOLDER = L.PLACEHOLDER_PREFIX + "{}"  # a removed task's slot: FT reads ids 0..num_tasks-1, so slots never move
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _write(path: Path, t: torch.Tensor, dtype: str) -> None:
    # straight to the file's dtype: no fp32 detour for an fp16 checkpoint, so one extra copy at most
    t.detach().to(TORCH_DTYPES[dtype]).contiguous().numpy().tofile(path)


def read_prefixes(paths, d: FTDims, base: str | None = None, base_label: str = "--model",
                  allow_other_base: bool = False) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """Load prefixes and check them against the FT dims and the base model; (tasks, problems)."""
    tasks, problems, seen = [], [], set()
    for path in paths:
        try:
            table, shape, meta = load_prefix(path)
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e))
            continue
        name = task_of(path, meta)  # an empty header field is refused, not replaced
        bad_name = L.task_name_problem(name)
        if bad_name:
            where = "header field task" if "task" in meta else "task from the file name (the header has none)"
            problems.append(f"{path}: {where}: {bad_name}; {L.RENAME_HINT}")
        elif name in seen:
            problems.append(f"{path}: task name {name!r} given twice; pass each task once, or rename one with "
                            "`python -m prefixtune.convert retask`")
        seen.add(name)
        problems += prefix_problems(path, shape, meta, d, base=base, base_label=base_label,
                                    allow_other_base=allow_other_base)
        tasks.append((name, table))
    return tasks, problems


def _replace_dir(tmp: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    moved = False
    if target.exists():
        target.rename(old)
        moved = True
    try:
        tmp.rename(target)
    except OSError:
        if moved:
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _missing_dirs(folder: Path) -> list[Path]:
    """The folders `mkdir(parents=True)` would create, outermost first."""
    made = []
    while not folder.exists() and folder.parent != folder:
        made.append(folder)
        folder = folder.parent
    return made[::-1]


def export(model_dir, prefixes, out, tp: int = 1, dtype: str = "fp16", force: bool = False,
           model_name: str | None = None, progress: bool = True, allow_other_base: bool = False) -> Path:
    from transformers import AutoConfig

    model_dir, out = Path(model_dir), Path(out)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:  # before anything, so no folder is made
        raise ExportError(f"cannot export: --tp {tp}: expected a tensor-parallel size >= 1 (GPUs per model "
                          "instance); pass --tp 1 for one GPU")
    problems = []
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ExportError(f"--model {model_dir}: cannot read a Hugging Face config ({e})") from None
    problems += L.check_servable(config, tp)
    if problems and getattr(config, "model_type", None) != "gpt_neox":
        raise ExportError.of("cannot export", problems)
    d = FTDims.from_config(config)
    tasks, prefix_problems_ = read_prefixes(prefixes, d, base=str(model_dir), allow_other_base=allow_other_base)
    problems += prefix_problems_
    if dtype not in L.NP_DTYPES:
        problems.append(f"--dtype {dtype}: expected one of {', '.join(L.NP_DTYPES)}")
    target = out / f"{tp}-gpu"
    if target.exists() and not target.is_dir():
        problems.append(f"{target} is a file, not an export folder: pass another --out")
    elif target.exists() and not force:
        problems.append(f"{target} exists: pass --force to overwrite it, or add tasks with "
                        "`python -m prefixtune.convert add`")
    elif target.exists() and not (target / "config.ini").is_file() and any(target.iterdir()):
        problems.append(f"{target} is not an export (no config.ini): refusing to replace it even with --force; "
                        "pass another --out")
    where = writable_problem(out, "--out")
    if where:
        problems.append(where)
    if problems:
        raise ExportError.of("cannot export", problems)

    made = _missing_dirs(out)
    tmp = out / f".{tp}-gpu.tmp{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_base(model_dir, tmp, d, tp, dtype, progress)
        for name, table in tasks:
            for fname, t in L.prefix_files(name, table, d, tp).items():
                _write(tmp / fname, t, dtype)
        extra = {"tensor_para_size": tp, "source_model": str(model_dir.resolve()), "writer": "prefixtune"}
        ex = Export(path=tmp, dims=d, tp=tp, dtype=dtype, tasks=tuple((n, t.shape[0]) for n, t in tasks),
                    start_id=config.bos_token_id or 0, end_id=config.eos_token_id or 0,
                    model_name=model_name or model_dir.name, extra=extra)
        write_index(ex)
        problems = check_files(ex)  # FT would only warn about these and serve garbage
        if problems:
            raise ExportError.of("the export failed its own file check", problems)
        _replace_dir(tmp, target)
    except OSError as e:
        raise ExportError(f"cannot export: writing under --out {out} failed ({e}); nothing was changed, pass an "
                          "--out you can write to") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            for folder in reversed(made):  # folders made for a failed export
                try:
                    folder.rmdir()
                except OSError:
                    break
    return target


def _write_base(model_dir: Path, dst: Path, d: FTDims, tp: int, dtype: str, progress: bool) -> None:
    from tqdm import tqdm

    wanted = set(L.expected_sizes(d, tp, {}))
    written, biases = set(), {}
    for name, t in tqdm(iter_tensors(model_dir), desc="convert", unit="tensor", disable=not progress):
        files = L.base_files(name, t, d, tp)
        for fname, arr in (files or {}).items():
            if fname.endswith(("attention.dense.bias.bin", "mlp.dense_4h_to_h.bias.bin")):
                layer = int(fname.split(".")[2])
                biases.setdefault(layer, {})["attn" if "attention.dense" in fname else "mlp"] = arr.clone()
                if len(biases[layer]) == 2:
                    b = biases.pop(layer)
                    for bname, barr in L.residual_bias_files(layer, b["attn"], b["mlp"], d, tp).items():
                        _write(dst / bname, barr, dtype)
                        written.add(bname)
                continue
            _write(dst / fname, arr, dtype)
            written.add(fname)
        del t
    missing = sorted(wanted - written)
    if missing:
        raise ExportError(f"{model_dir}: the checkpoint lacks tensors for {len(missing)} FT files, e.g. "
                          f"{', '.join(missing[:3])}; is it a complete GPTNeoXForCausalLM checkpoint?")


def list_tasks(export_dir) -> list[tuple[int, str, int]]:
    ex = read_export(export_dir)
    return [(i, n, p) for i, (n, p) in enumerate(ex.tasks) if not L.is_placeholder(n)]


def add_tasks(export_dir, prefixes, replace: bool = False, allow_other_base: bool = False) -> list[tuple[int, str]]:
    """Add prefixes to an export (or replace same-named ones with `replace`); the base weights are untouched and
    every other task keeps its id. Returns (id, name) of the written tasks."""
    ex = read_export(export_dir)
    export_dir = ex.path
    base = ex.source_model or ex.model_name
    new, problems = read_prefixes(prefixes, ex.dims, base=base, base_label="the export's source model",
                                  allow_other_base=allow_other_base)
    live = ex.live
    for name, _ in new:
        if name in live and not replace:
            problems.append(f"task {name!r} is already in {export_dir} (id {live[name]}): pass --replace "
                            "to overwrite it")
    where = writable_problem(export_dir, "export folder")
    if where:
        problems.append(where)
    if problems:
        raise ExportError.of("cannot add", problems)
    tasks = list(ex.tasks)
    names = [n for n, _ in tasks]
    done, staged = [], []
    try:
        for name, table in new:  # every file first under a temporary name, then all renamed into place
            for fname, t in L.prefix_files(name, table, ex.dims, ex.tp).items():
                tmp = export_dir / f".{fname}.tmp{os.getpid()}"
                staged.append((tmp, export_dir / fname))
                _write(tmp, t, ex.dtype)
        for tmp, final in staged:
            os.replace(tmp, final)
        for name, table in new:
            if name in names:
                i = names.index(name)
                tasks[i] = (name, table.shape[0])
            else:
                tasks.append((name, table.shape[0]))
                names.append(name)
                i = len(tasks) - 1
            done.append((i, name))
        write_index(ex.with_tasks(tasks))
    except OSError as e:
        raise ExportError(f"cannot add: writing into {export_dir} failed ({e}); pass an export you can write to") \
            from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return done


def remove_tasks(export_dir, names: list[str]) -> None:
    """Remove tasks; their ids become placeholders of length 0 (FT skips them), so no other id moves."""
    ex = read_export(export_dir)
    export_dir = ex.path
    live = ex.live
    unknown = [n for n in names if n not in live]
    if unknown:
        raise ExportError(f"cannot remove {', '.join(map(repr, unknown))}: not a task of {export_dir} "
                          f"(tasks: {', '.join(live) or 'none'}); see `python -m prefixtune.convert tasks "
                          f"{export_dir}`")
    where = writable_problem(export_dir, "export folder")
    if where:
        raise ExportError(f"cannot remove: {where}")
    tasks = list(ex.tasks)
    for name in names:
        tasks[live[name]] = (PLACEHOLDER.format(live[name]), 0)
    try:
        write_index(ex.with_tasks(tasks))
        for name in names:
            for r in range(ex.tp):
                (export_dir / f"model.prefix_prompt.{name}.weight.{r}.bin").unlink(missing_ok=True)
    except OSError as e:
        raise ExportError(f"cannot remove: writing into {export_dir} failed ({e})") from None
