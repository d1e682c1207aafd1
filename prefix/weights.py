"""A base model's weights through transformers: dtypes, one-line loading errors, the complete-checkpoint check,
and the plain Hugging Face folder save. Shared by every loading route (prefix/base.py, offload.py, quantize.py)
and by the GGUF cache (gguf_cache.py).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .errors import one_line
from .io import file_mode
from .resolve import DEFAULT_MODEL, is_default_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def loading(model: str | None, what: str, fn):
    """fn() (a from_pretrained call), its error (Hugging Face raises OSError, ValueError, KeyError, struct errors ...)
    reworded as a one-line ValueError naming --model and `what` was being loaded."""
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


def from_pretrained_complete(model: str | None, where: str, kwargs: dict, **extra):
    """AutoModelForCausalLM.from_pretrained(where, **kwargs, **extra), refusing a checkpoint that lacks some of the
    model's weights: transformers would initialise them at random and only print a report (a vocab-only GGUF, a
    folder missing a shard or a tensor). Errors as `loading` words them."""
    from transformers import AutoModelForCausalLM

    with load_report_held() as held:
        base, info = loading(model, "model weights", lambda: AutoModelForCausalLM.from_pretrained(
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


def save_plain_model(base, tok, folder, narrow: bool = False) -> None:
    """Save a loaded base (and its tokenizer) as a plain Hugging Face folder. A GGUF checkpoint loads dequantized but
    keeps a quantization_config that would make the saved folder claim GGUF weights; it is dropped, and the
    dequantized weights are saved as they are (`narrow`: each in fp16 or bf16 where that holds it exactly). Tied
    weights are stored once under the name save_pretrained keeps (`model.embed_tokens.weight`, no `lm_head.weight`),
    so any loader (vLLM's too) finds them. (For the GGUF cache, transformers serve, disk offload.) Written on any
    rank: `save_pretrained` writes weights only on rank 0 of a process group."""
    from safetensors.torch import save_file

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
