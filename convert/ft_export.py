"""Export a GPT-NeoX model and prefixes to FasterTransformer files; add, replace, remove and list tasks.

Nothing is written until every input has been checked, the export is built in a temporary folder beside the
target and renamed into place, so a failure leaves OUT as it was.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from prefixtune.prefix.io import atomic_write_text, load_prefix

from . import ft_layout as L
from .hf_stream import iter_tensors

PLACEHOLDER = "_removed_{}"  # a removed task's slot: FT reads ids 0..num_tasks-1, so slots never move


class ExportError(ValueError):
    """Bad input to an export; the message lists every problem."""


TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _write(path: Path, t: torch.Tensor, dtype: str) -> None:
    # straight to the file's dtype: no fp32 detour for an fp16 checkpoint, so one extra copy at most
    t.detach().to(TORCH_DTYPES[dtype]).contiguous().numpy().tofile(path)


def read_prefixes(paths, d: dict) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """Load prefixes and check them against the FT dims; (tasks, problems)."""
    tasks, problems, seen = [], [], set()
    for path in paths:
        try:
            table, shape, meta = load_prefix(path)
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e))
            continue
        name = meta.get("task") or Path(path).stem
        if not L.TASK_NAME.match(name) or name.startswith("_removed_"):
            problems.append(f"{path}: task name {name!r} must be 1-64 letters, digits, '_' or '-' (it becomes part "
                            "of file names and config.ini); retrain with another --task or rename with "
                            "`python -m prefixtune.convert rename`")
        elif name in seen:
            problems.append(f"{path}: task name {name!r} given twice")
        seen.add(name)
        want = {"num_layers": d["layers"], "num_kv_heads": d["heads"], "head_dim": d["head_dim"]}
        bad = [f"{k}: prefix has {getattr(shape, k)}, model has {v}" for k, v in want.items() if getattr(shape, k) != v]
        if bad:
            problems.append(f"{path} was trained on another model shape ({meta.get('base_model')}): " + "; ".join(bad))
        tasks.append((name, table))
    return tasks, problems


def _replace_dir(tmp: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def export(model_dir, prefixes, out, tp: int = 1, dtype: str = "fp16", force: bool = False,
           model_name: str | None = None, progress: bool = True) -> Path:
    from transformers import AutoConfig

    model_dir, out = Path(model_dir), Path(out)
    problems = []
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ExportError(f"--model {model_dir}: cannot read a Hugging Face config ({e})") from None
    problems += L.check_servable(config, tp)
    if problems and getattr(config, "model_type", None) != "gpt_neox":
        raise ExportError("\n".join(problems))
    d = L.ft_dims(config)
    tasks, prefix_problems = read_prefixes(prefixes, d)
    problems += prefix_problems
    if dtype not in L.NP_DTYPES:
        problems.append(f"--dtype {dtype}: expected one of {', '.join(L.NP_DTYPES)}")
    target = out / f"{tp}-gpu"
    if target.exists() and not force:
        problems.append(f"{target} exists: pass --force to overwrite it, or add tasks with `python -m prefixtune.convert add`")
    if problems:
        raise ExportError("cannot export:\n  " + "\n  ".join(problems))

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{tp}-gpu.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_base(model_dir, tmp, d, tp, dtype, progress)
        for name, table in tasks:
            for fname, t in L.prefix_files(name, table, d, tp).items():
                _write(tmp / fname, t, dtype)
        extra = {"tensor_para_size": tp, "source_model": str(model_dir.resolve()), "writer": "prefixtune"}
        start, end = (config.bos_token_id or 0), (config.eos_token_id or 0)
        _write_index(tmp, d, [(n, t.shape[0]) for n, t in tasks], dtype, start, end, model_name or model_dir.name,
                     extra)
        from .ft_verify import check_files

        problems = check_files(tmp)  # FT would only warn about these and serve garbage
        if problems:
            raise ExportError("the export failed its own file check:\n  " + "\n  ".join(problems))
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_base(model_dir: Path, dst: Path, d: dict, tp: int, dtype: str, progress: bool) -> None:
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


def _write_index(dst: Path, d: dict, tasks: list[tuple[str, int]], dtype: str, start: int, end: int,
                 model_name: str, extra: dict) -> None:
    atomic_write_text(dst / "config.ini", L.config_ini(d, model_name=model_name, start_id=start, end_id=end,
                                                       dtype=dtype, tasks=tasks, extra=extra))
    live = {n: i for i, (n, _) in enumerate(tasks) if not n.startswith("_removed_")}
    atomic_write_text(dst / "tasks.json", json.dumps(live, indent=2) + "\n")


def read_export(export_dir) -> tuple[dict, dict, list[tuple[str, int]], dict]:
    export_dir = Path(export_dir)
    ini = export_dir / "config.ini"
    if not ini.is_file():
        raise ExportError(f"{export_dir}: no config.ini; expected an export folder such as OUT/2-gpu")
    return L.read_config_ini(ini.read_text(encoding="utf-8"))


def list_tasks(export_dir) -> list[tuple[int, str, int]]:
    _, _, tasks, _ = read_export(export_dir)
    return [(i, n, p) for i, (n, p) in enumerate(tasks) if not n.startswith("_removed_")]


def add_tasks(export_dir, prefixes, replace: bool = False) -> list[tuple[int, str]]:
    """Add prefixes to an export (or replace same-named ones with `replace`); the base weights are untouched and
    every other task keeps its id. Returns (id, name) of the written tasks."""
    export_dir = Path(export_dir)
    d, g, tasks, extra = read_export(export_dir)
    tp, dtype = int(extra.get("tensor_para_size", export_dir.name.split("-")[0])), g["weight_data_type"]
    new, problems = read_prefixes(prefixes, d)
    names = [n for n, _ in tasks]
    for name, _ in new:
        if name in names and not replace:
            problems.append(f"task {name!r} is already in {export_dir} (id {names.index(name)}): pass --replace "
                            "to overwrite it")
    if problems:
        raise ExportError("cannot add:\n  " + "\n  ".join(problems))
    done = []
    for name, table in new:
        for fname, t in L.prefix_files(name, table, d, tp).items():
            tmp = export_dir / f".{fname}.tmp{os.getpid()}"
            _write(tmp, t, dtype)
            os.replace(tmp, export_dir / fname)
        if name in names:
            i = names.index(name)
            tasks[i] = (name, table.shape[0])
        else:
            tasks.append((name, table.shape[0]))
            names.append(name)
            i = len(tasks) - 1
        done.append((i, name))
    _write_index(export_dir, d, tasks, dtype, int(g["start_id"]), int(g["end_id"]), g["model_name"], extra)
    return done


def remove_tasks(export_dir, names: list[str]) -> None:
    """Remove tasks; their ids become placeholders of length 0 (FT skips them), so no other id moves."""
    export_dir = Path(export_dir)
    d, g, tasks, extra = read_export(export_dir)
    live = {n: i for i, (n, _) in enumerate(tasks)}
    unknown = [n for n in names if n not in live or n.startswith("_removed_")]
    if unknown:
        raise ExportError(f"cannot remove {', '.join(map(repr, unknown))}: not a task of {export_dir} "
                          f"(tasks: {', '.join(n for _, n, _ in list_tasks(export_dir)) or 'none'})")
    tp = int(extra.get("tensor_para_size", export_dir.name.split("-")[0]))
    for name in names:
        tasks[live[name]] = (PLACEHOLDER.format(live[name]), 0)
    _write_index(export_dir, d, tasks, g["weight_data_type"], int(g["start_id"]), int(g["end_id"]), g["model_name"],
                 extra)
    for name in names:
        for r in range(tp):
            (export_dir / f"model.prefix_prompt.{name}.weight.{r}.bin").unlink(missing_ok=True)
