"""A quantized frozen base (`--quantize`): weight-only quantization through transformers' quantization configs.

    none      full precision (the default)
    int8      torchao Int8WeightOnlyConfig: int8 weights with one scale per output row; CPU and GPU
    int4      torchao IntxWeightOnlyConfig(weight_dtype=torch.int4), groups of 32 input columns (fewer when a Linear's
              width needs it); CPU and GPU. In torchao 0.18 this is the one 4-bit config that runs on an x86 CPU,
              and it keeps each 4-bit value in an int8 byte (IntxUnpackedToInt8Tensor): int4 accuracy at int8 size.
              Int4WeightOnlyConfig's packed layouts need CUDA (tinygemm, mslk/fbgemm), XPU or NPU, and
              IntxWeightOnlyConfig's opaque layouts need Arm's KleidiAI or torchao's C++ CPU kernels
    bnb-8bit  bitsandbytes LLM.int8() (BitsAndBytesConfig(load_in_8bit=True)); CUDA only
    bnb-4bit  bitsandbytes NF4 (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")); CUDA only
    gptq      GPTQConfig(bits=4) calibrated on c4 while loading (needs gptqmodel and the dataset); CUDA only

Only the Linear layers of the decoder are quantized, as transformers does (the embeddings and the output layer stay
in full precision); the prefix, its encoder and attention over it are untouched. A GGUF model (the embedded default)
is dequantized by transformers on load, and transformers refuses a quantization config with a GGUF file, so its
dequantized Linear weights are re-quantized in place with torchao's `quantize_` and the same torchao config.
Every refusal is a one-line ValueError: "expected X, got Y, use Z".
"""
from __future__ import annotations

import contextlib
import importlib.util

import torch

from .errors import one_line
from .flags import QUANTIZE_CHOICES, add_quantize_flag  # noqa: F401 (the flag lives where --help needs no torch)
from .shapes import base_dims, text_config
from .weights import from_pretrained_complete

TORCHAO_KINDS = ("int8", "int4")  # run on any device
GPU_KINDS = ("bnb-8bit", "bnb-4bit", "gptq")  # bitsandbytes and GPTQ kernels are CUDA kernels
INT4_GROUP_SIZES = (32, 16, 8)  # the first that divides every quantized Linear's input width


def _device_type(device) -> str:
    return torch.device(device).type if device is not None else "cpu"


def _need(package: str, kind: str, extra: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"--quantize {kind}: expected the {package} package, got none installed; use pip install "
                         f"{extra}, or --quantize none")


def int4_group_size(config) -> int | None:
    """The int4 group size for a model: the largest of INT4_GROUP_SIZES dividing the input width of every decoder
    Linear (hidden size, MLP width, heads x head size); None = one scale per output row."""
    text = text_config(config)
    widths = [getattr(text, "hidden_size", None), getattr(text, "intermediate_size", None)]
    try:
        _, heads, _, head_dim = base_dims(config)
        widths.append(heads * head_dim)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        pass
    widths = [w for w in widths if isinstance(w, int) and w > 0]
    for g in INT4_GROUP_SIZES:
        if all(w % g == 0 for w in widths):
            return g
    return None


def torchao_config(kind: str, config=None):
    """The torchao AOBaseConfig for int8 or int4."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if kind == "int8":
        return Int8WeightOnlyConfig()
    group = int4_group_size(config) if config is not None else INT4_GROUP_SIZES[0]
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group) if group else PerAxis(0))


def quantization_config(kind: str | None, device="cpu", config=None, dtype: torch.dtype | None = None,
                        tokenizer=None):
    """The transformers quantization config for --quantize `kind` on `device` (None for none). `config` (the
    model's) picks int4's group size; `dtype` is bitsandbytes' compute dtype; `tokenizer` (a name or object) is
    GPTQ's calibration tokenizer. One-line ValueError when the kind cannot run there."""
    kind = kind or "none"
    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize: expected one of {', '.join(QUANTIZE_CHOICES)}, got {kind!r}; use int8 or int4 "
                         "on CPU")
    if kind == "none":
        return None
    where = _device_type(device)
    if kind in GPU_KINDS and where != "cuda":
        lib = "GPTQ" if kind == "gptq" else "bitsandbytes"
        raise ValueError(f"--quantize {kind}: expected a CUDA GPU ({lib} quantizes and computes with CUDA kernels), "
                         f"got device {where}; use --quantize int8 or int4 (torchao, weight-only) on {where}")
    if kind in TORCHAO_KINDS:
        _need("torchao", kind, "'prefixtune[quant]' (torchao)")
        from transformers import TorchAoConfig

        return TorchAoConfig(quant_type=torchao_config(kind, config))
    if kind.startswith("bnb-"):
        _need("bitsandbytes", kind, "bitsandbytes")
        from transformers import BitsAndBytesConfig

        if kind == "bnb-8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=dtype or torch.bfloat16)
    _need("gptqmodel", kind, "gptqmodel optimum")
    from transformers import GPTQConfig

    return GPTQConfig(bits=4, dataset="c4", tokenizer=tokenizer)


def is_quantized_tensor(t: torch.Tensor) -> bool:
    """A torchao tensor subclass or a bitsandbytes parameter: not a plain floating-point tensor."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter) or not t.dtype.is_floating_point


def _storage(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly subclassed) tensor stores: torchao's qdata, scale, zero_point, ..."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [inner for n in names for inner in _storage(getattr(t, n))]
    return [t]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers occupy (a quantized weight counts its int storage and its scales;
    tied weights once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += sum(s.numel() * s.element_size() for s in _storage(t))
    return total


def quantized_count(model: torch.nn.Module) -> tuple[int, int]:
    """(quantized Linear weights, all Linear weights) of the model."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(is_quantized_tensor(m.weight) for m in linears), len(linears)


def _quantize_in_place(base, qconfig) -> None:
    """torchao's quantize_ over the decoder's Linear layers, leaving the output layer out as transformers does."""
    from torchao.quantization import quantize_

    output = base.get_output_embeddings()
    quantize_(base, qconfig.get_apply_tensor_subclass(),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and m is not output)


def load_quantized(model, where: str, kwargs: dict, config, dtype: torch.dtype, device, kind: str, log=None):
    """from_pretrained with --quantize `kind` (not none); arguments as `load_base` resolved them. The model comes
    back frozen, in eval mode, on `device`."""
    qconfig = quantization_config(kind, device, config, dtype, tokenizer=where)
    gguf = "gguf_file" in kwargs
    if gguf and kind not in TORCHAO_KINDS:
        raise ValueError(f"--quantize {kind}: expected a Hugging Face model folder (transformers cannot combine a "
                         "GGUF file with bitsandbytes or GPTQ), got a .gguf file; save it with save_pretrained and "
                         "pass that folder as --model, or use --quantize int8 or int4")
    extra = {} if gguf else {"quantization_config": qconfig}
    if kind in GPU_KINDS:  # bitsandbytes and GPTQ place the weights while quantizing; .to() would be refused
        extra["device_map"] = {"": torch.device(device)}
    base = from_pretrained_complete(model, where, kwargs, config=config, dtype=dtype, **extra)
    if gguf:
        try:
            _quantize_in_place(base, qconfig)
        except Exception as e:  # noqa: BLE001 - torchao asserts on shapes it cannot group
            raise ValueError(f"--quantize {kind}: torchao cannot quantize this model ({one_line(e)}); use "
                             "--quantize int8 or none") from e
    if kind not in GPU_KINDS:
        base.to(device)
    base.eval().requires_grad_(False)
    done, linears = quantized_count(base)
    if done == 0:
        mt = getattr(config, "model_type", "this model")
        raise ValueError(f"--quantize {kind}: expected Linear layers to quantize, got none of {linears} quantized in "
                         f"{mt} (GPT-2 uses Conv1D layers, which torchao and bitsandbytes leave alone); use "
                         "--quantize none, or a model with Linear layers (Llama, GPT-NeoX)")
    if log is not None:
        log(f"quantize {kind}: {done} of {linears} Linear weights quantized"
            + (" (the GGUF weights dequantized on load, then re-quantized)" if gguf else "")
            + f"; weights {weight_bytes(base) / 2**20:.1f} MiB")
    return base


@contextlib.contextmanager
def hidden_from_deepspeed(model):
    """Inside this block `model.base` (a PrefixLM's frozen base) is an empty module when its weights are quantized,
    so that deepspeed.initialize never sees them: its engine moves every parameter with module.to(device), which
    must swap a tensor subclass for a new one, and DeepSpeed's own name map holds a weakref.finalize on each
    parameter, so torch refuses the swap ("Couldn't swap Linear.weight"). Frozen weights need nothing from
    DeepSpeed (no gradients, no optimizer state, no ZeRO partitioning, no cast: they load on the device and in the
    training precision); the same base comes back after the block, and forward passes go through it as usual."""
    base = getattr(model, "base", None)
    if base is None or not any(is_quantized_tensor(p) for p in base.parameters()):
        yield
        return
    model.base = torch.nn.Module()
    try:
        yield
    finally:
        model.base = base
