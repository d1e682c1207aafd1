"""A Triton model repository for the `fastertransformer` backend over an FT export, and how to pick a task.

    <repo>/<name>/config.pbtxt      backend fastertransformer, tensor_para_size, model_checkpoint_path,
                                    the optional prompt_learning_task_name_ids input, dynamic batching
    <repo>/<name>/1/                (empty: the weights stay in the export folder)
    <repo>/<name>/tasks.json        task name -> id to send as prompt_learning_task_name_ids
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefixtune.prefix.io import atomic_write_text

from .ft_export import read_export

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


def config_pbtxt(name: str, export_dir: Path, tp: int, data_type: str, max_batch_size: int) -> str:
    ins = ",\n".join(
        f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: {d}\n' + ("    optional: true\n" if o else "") + "  }"
        for n, t, d, o in _INPUTS)
    outs = ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: {d}\n  }}' for n, t, d in _OUTPUTS)
    params = {"tensor_para_size": tp, "pipeline_para_size": 1, "data_type": data_type, "model_type": "GPT-NeoX",
              "model_checkpoint_path": str(export_dir.resolve()), "enable_custom_all_reduce": 0}
    par = "\n".join(f'parameters {{\n  key: "{k}"\n  value: {{\n    string_value: "{v}"\n  }}\n}}' for k, v in params.items())
    return (f'name: "{name}"\nbackend: "fastertransformer"\ndefault_model_filename: "{name}"\n'
            f"max_batch_size: {max_batch_size}\nmodel_transaction_policy {{\n  decoupled: false\n}}\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: 50000\n}}\n"
            f"input [\n{ins}\n]\noutput [\n{outs}\n]\n"
            f'instance_group [\n  {{\n    count: 1\n    kind: KIND_CPU\n  }}\n]\n{par}\n')


def write_repository(export_dir, repo, name: str = "fastertransformer", max_batch_size: int = 8) -> Path:
    export_dir = Path(export_dir)
    _, g, _, extra = read_export(export_dir)
    tp = int(extra.get("tensor_para_size", export_dir.name.split("-")[0]))
    model = Path(repo) / name
    (model / "1").mkdir(parents=True, exist_ok=True)
    atomic_write_text(model / "config.pbtxt", config_pbtxt(name, export_dir, tp, g["weight_data_type"], max_batch_size))
    shutil.copyfile(export_dir / "tasks.json", model / "tasks.json")
    return model


def task_id(tasks_json, task: str) -> int:
    """The id to send as `prompt_learning_task_name_ids` for `task`, from an export's tasks.json."""
    ids = json.loads(Path(tasks_json).read_text(encoding="utf-8"))
    if task not in ids:
        raise KeyError(f"task {task!r} is not served; served tasks: {', '.join(ids) or 'none'}")
    return ids[task]
