"""A Triton model repository for the `fastertransformer` backend over an FT export, and how to pick a task.

    <repo>/<name>/config.pbtxt      backend fastertransformer, tensor_para_size, model_checkpoint_path,
                                    the optional prompt_learning_task_name_ids input, dynamic batching
    <repo>/<name>/1/                (empty: the weights stay in the export folder)
    <repo>/<name>/tasks.json        task name -> id to send as prompt_learning_task_name_ids

tasks.json is a copy made when the repository is written; `task_id` checks a task against the export's live
config.ini too (the folder named by model_checkpoint_path), so a task removed or moved since is refused instead
of being served as the bare base model.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..prefix.io import atomic_write_text
from .export_dir import Export, ExportError, read_export

_INPUTS = [  # (name, data type, dims, optional)
    ("input_ids", "TYPE_UINT32", "[ -1 ]", False),
    ("input_lengths", "TYPE_UINT32", "[ 1 ]", False),
    ("request_output_len", "TYPE_UINT32", "[ -1 ]", False),
    ("runtime_top_k", "TYPE_UINT32", "[ 1 ]", True),
    ("runtime_top_p", "TYPE_FP32", "[ 1 ]", True),
    ("temperature", "TYPE_FP32", "[ 1 ]", True),
    ("random_seed", "TYPE_UINT64", "[ 1 ]", True),
    ("end_id", "TYPE_UINT32", "[ 1 ]", True),
    ("prompt_learning_task_name_ids", "TYPE_UINT32", "[ 1 ]", True),
]
_OUTPUTS = [("output_ids", "TYPE_UINT32", "[ -1, -1 ]"), ("sequence_length", "TYPE_UINT32", "[ -1 ]")]
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_PARAM = re.compile(r'key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"')


class TaskError(ExportError):
    """A task a client asked for that the deployment does not serve as that task."""


def _quote(v) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"')


def _unquote(v: str) -> str:
    return re.sub(r"\\(.)", r"\1", v)


def config_pbtxt(name: str, export_dir: Path, tp: int, data_type: str, max_batch_size: int) -> str:
    ins = ",\n".join(
        f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: {d}\n' + ("    optional: true\n" if o else "") + "  }"
        for n, t, d, o in _INPUTS)
    outs = ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: {d}\n  }}' for n, t, d in _OUTPUTS)
    params = {"tensor_para_size": tp, "pipeline_para_size": 1, "data_type": data_type, "model_type": "GPT-NeoX",
              "model_checkpoint_path": str(Path(export_dir).resolve()), "enable_custom_all_reduce": 0}
    par = "\n".join(f'parameters {{\n  key: "{k}"\n  value: {{\n    string_value: "{_quote(v)}"\n  }}\n}}'
                    for k, v in params.items())
    return (f'name: "{name}"\nbackend: "fastertransformer"\ndefault_model_filename: "{name}"\n'
            f"max_batch_size: {max_batch_size}\nmodel_transaction_policy {{\n  decoupled: false\n}}\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: 50000\n}}\n"
            f"input [\n{ins}\n]\noutput [\n{outs}\n]\n"
            f'instance_group [\n  {{\n    count: 1\n    kind: KIND_CPU\n  }}\n]\n{par}\n')


def pbtxt_parameters(config_pbtxt_path) -> dict[str, str]:
    """The string parameters of a config.pbtxt written by `config_pbtxt`."""
    text = Path(config_pbtxt_path).read_text(encoding="utf-8")
    return {k: _unquote(v) for k, v in _PARAM.findall(text)}


def write_repository(export_dir, repo, name: str = "fastertransformer", max_batch_size: int = 8) -> Path:
    """Create or update <repo>/<name>; config.pbtxt and tasks.json are rewritten from the export's config.ini every
    time, so re-running it after `add`/`remove` brings the repository back in step."""
    ex = read_export(export_dir)
    if not _MODEL_NAME.match(name):
        raise ExportError(f"--name {name!r}: expected letters, digits, '_', '-' or '.' (a folder of the "
                          "repository), not starting with '.' or '-'")
    if max_batch_size < 1:
        raise ExportError(f"--max_batch_size {max_batch_size}: expected >= 1")
    model = Path(repo) / name
    try:
        (model / "1").mkdir(parents=True, exist_ok=True)
        atomic_write_text(model / "config.pbtxt", config_pbtxt(name, ex.path, ex.tp, ex.dtype, max_batch_size))
        atomic_write_text(model / "tasks.json", ex.tasks_json_text())
    except OSError as e:
        raise ExportError(f"cannot write the Triton repository --repo {repo} ({e}); pass a --repo you can write "
                          "to") from None
    return model


def _rerun(ex: Export, tasks_json: Path) -> str:
    model = tasks_json.parent
    name = "" if model.name == "fastertransformer" else f" --name {model.name}"
    return (f"re-run `python -m prefixtune.convert triton {ex.path} --repo {model.parent}{name}` and reload the "
            "model in Triton")


def task_id(tasks_json, task: str, export_dir=None) -> int:
    """The id to send as `prompt_learning_task_name_ids` for `task`, from a Triton repository's tasks.json, checked
    against the export's live config.ini (`export_dir`, default: model_checkpoint_path of the config.pbtxt beside
    tasks.json). Raises TaskError for a task that is not served, was removed, or whose id changed."""
    tasks_json = Path(tasks_json)
    try:
        ids = json.loads(tasks_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TaskError(f"--tasks {tasks_json}: cannot read it ({e}); pass the tasks.json that "
                        "`python -m prefixtune.convert triton` wrote into the repository") from None
    if export_dir is None:
        pbtxt = tasks_json.parent / "config.pbtxt"
        if not pbtxt.is_file():
            raise TaskError(f"--tasks {tasks_json}: no config.pbtxt beside it, so the export it came from is "
                            "unknown; pass the tasks.json inside the Triton model folder, or the export folder "
                            "with --export")
        export_dir = pbtxt_parameters(pbtxt).get("model_checkpoint_path")
        if not export_dir:
            raise TaskError(f"{pbtxt}: no model_checkpoint_path parameter; {tasks_json} cannot be checked against "
                            "its export: pass the export folder with --export")
    try:
        ex = read_export(export_dir)
    except ExportError as e:
        raise TaskError(f"cannot check task {task!r} against the export {export_dir} named by the repository ({e}); "
                        "pass a readable copy of the export folder with --export") from None
    live = ex.live
    if task not in ids:
        if task in live:
            raise TaskError(f"task {task!r} is task {live[task]} of {ex.path / 'config.ini'} but not in "
                            f"{tasks_json}: the repository is out of date; {_rerun(ex, tasks_json)}")
        raise TaskError(f"task {task!r} is not served; served tasks: {', '.join(live) or 'none'}")
    if task not in live:
        raise TaskError(f"task {task!r} was removed from {ex.path / 'config.ini'} after {tasks_json} was written "
                        f"(FT would serve id {ids[task]} as the bare base model); {_rerun(ex, tasks_json)}")
    if live[task] != ids[task]:
        raise TaskError(f"task {task!r} has id {live[task]} in {ex.path / 'config.ini'}, but {tasks_json} says "
                        f"{ids[task]}; {_rerun(ex, tasks_json)}")
    return live[task]
