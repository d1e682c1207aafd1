"""Load a frozen base model and its tokenizer: a Hugging Face folder, a `.gguf` file, or the embedded default.

Which model --model names is prefix/resolve.py; which models prefix tuning can serve is prefix/support.py
(`check_base_supported`, called before any weights are read); the weights themselves go through prefix/weights.py,
in memory, offloaded (offload.py), quantized (quantize.py) or from the GGUF cache (gguf_cache.py).
Every loading error is a one-line `ValueError` or `FileNotFoundError` that names `--model`.
"""
from __future__ import annotations

import torch

from . import gguf_cache
from .offload import load_offloaded, offload_options
from .quantize import load_quantized
from .resolve import model_display_name, resolve_model
from .support import check_base_supported
from .weights import DTYPES, from_pretrained_complete, loading

# Still imported from here by modules being moved (prefix/io.py, serve/, inference/); their homes are errors.py and
# resolve.py, and these lines go once nothing imports them from base.


def load_config(model: str | None):
    """The model's config, checked with `check_base_supported` (reads no weights)."""
    from transformers import AutoConfig

    where, kwargs = gguf_cache.lookup(*resolve_model(model))
    config = loading(model, "model config", lambda: AutoConfig.from_pretrained(where, **kwargs))
    check_base_supported(config)
    return config


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    where, kwargs = gguf_cache.lookup(*resolve_model(model))
    tok = loading(model, "tokenizer", lambda: AutoTokenizer.from_pretrained(where, **kwargs))
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
    device_map, max_memory, offload_dir = offload_options(device_map, max_memory, offload_dir)
    if config is None:
        config = load_config(model)
    else:
        check_base_supported(config)
    where, kwargs = resolve_model(model)
    if quantize not in (None, "none"):
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
