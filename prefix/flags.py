"""Command-line pieces shared by `python -m train`, `prefix_inference` and `prefix_serve`, importable without torch.

`--help` and a bad flag answer from the parser alone: the parsers are built from this module (and the standard
library), and torch, transformers and DeepSpeed are imported only once the arguments are parsed (~5 s on a CPU, and
DeepSpeed's import prints an accelerator line).
"""
from __future__ import annotations

import argparse

QUANTIZE_CHOICES = ("none", "int8", "int4", "bnb-8bit", "bnb-4bit", "gptq")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies; "none" = no map
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # the keys of prefix.weights.DTYPES


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, except where the help already says what the default is (it
    mentions "default") or there is none to show (None): each default is shown once."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None:
            return text
        return super()._get_help_string(action)


def default_device() -> str:
    """--device when not given: the GPU if there is one, else the CPU (imports torch: call after parsing)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device (not used with --device_map, which places the weights itself) (default: cuda "
                        "when a GPU is there, else cpu)")


def add_quantize_flag(p: argparse.ArgumentParser) -> None:
    """--quantize, as prefix_inference, prefix_serve and training take it."""
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                   help="quantize the frozen base model's Linear weights while loading: int8 or int4 (torchao "
                        "weight-only; CPU and GPU; int4 keeps its 4-bit values in int8 bytes on CPU), bnb-8bit, "
                        "bnb-4bit (bitsandbytes) or gptq: CUDA only. The prefix stays in full precision")


def add_offload_flags(p: argparse.ArgumentParser) -> None:
    """--device_map, --max_memory, --offload_dir: a base model bigger than the GPU (or the RAM), through accelerate.
    prefix_inference and prefix_serve have the same flags."""
    p.add_argument("--device_map", choices=[*DEVICE_MAPS, "none"], default="none",
                   help="place the base model's weights with accelerate instead of loading it whole onto "
                        "--device: the GPU takes what fits --max_memory, CPU RAM the next part, the disk "
                        "(--offload_dir) the rest. Offloaded layers are copied in for every forward pass, so tokens "
                        "come slower and big batches pay off. auto, balanced and sequential are accelerate's "
                        "strategies; prefixtune computes on one GPU (--device's, or the one --max_memory names), "
                        "where they place alike. none: no offloading")
    p.add_argument("--max_memory", default=None, metavar="DEVICE=SIZE,...",
                   help="with --device_map: how much each device may hold, in accelerate's syntax, e.g. "
                        "0=14GiB,cpu=30GiB (GPU 0 and CPU RAM; disk=SIZE caps the disk). Sizes in KiB/MiB/GiB, "
                        "KB/MB/GB or bytes; without it, each device's free memory")
    p.add_argument("--offload_dir", default=None, metavar="DIR",
                   help="with --device_map: folder for the weights the map puts on disk. Needed for weights "
                        "that are not safetensors (.bin), which are written there; safetensors weights are read in "
                        "place from the model folder. Use one folder per model. (A .gguf model cannot be offloaded "
                        "to disk: transformers refuses it)")
