"""An offloaded base model: accelerate places the weights (`--device_map`, `--max_memory`, `--offload_dir`).

What does not fit the memory budget goes to the CPU or to disk and is moved in layer by layer when used; the
prefix still reaches every layer, since it travels with the attention call (or the cache) on the computing device.
The input embeddings stay on that device (`plan_device_map`): under a tiny budget accelerate would otherwise send
the whole model to disk, and every caller that takes the model's device from its first weight would see `meta`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import one_line
from .flags import DEVICE_MAPS  # accelerate's strategies; "none" = no map
from .weights import DTYPES, load_report_held, loading, refuse_missing_weights

_MEMORY_DEVICES = ("cpu", "disk", "mps")  # the named keys accelerate's max_memory accepts, besides GPU indices
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmg]i?b)?", re.IGNORECASE)
_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, None: 1}


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_max_memory(text: str | dict | None) -> dict | None:
    """accelerate's --max_memory syntax, `0=14GiB,cpu=30GiB,disk=200GB`, as the dict from_pretrained takes
    ({0: bytes, "cpu": bytes, "disk": bytes}). Keys: a GPU index (or cuda:N), cpu, disk, mps; sizes: a byte count
    or a number with KiB/MiB/GiB (powers of 2) or KB/MB/GB (powers of 10), in any case (accelerate alone would
    read a lowercase "b" as bits). A dict passes through as given.
    One-line ValueError naming --max_memory and the bad piece."""
    if text is None or isinstance(text, dict):
        return text
    flag = "--max_memory"
    if not str(text).strip():
        raise ValueError(f"{flag}: expected DEVICE=SIZE pieces separated by commas, like 0=14GiB,cpu=30GiB, got an "
                         "empty value")
    out: dict = {}
    gpus = _gpu_count()
    for piece in str(text).split(","):
        piece = piece.strip()
        if not piece:
            raise ValueError(f"{flag}: expected DEVICE=SIZE between the commas, got an empty piece in {text!r}")
        key, eq, size = (part.strip() for part in piece.partition("="))
        if not eq or not key or not size:
            raise ValueError(f"{flag}: expected DEVICE=SIZE like cpu=30GiB, got {piece!r}")
        name = key.lower()
        if name.startswith("cuda:"):
            name = name[5:]
        if name.isdigit():
            device = int(name)
            if device >= gpus:
                have = f"GPUs 0-{gpus - 1}" if gpus > 1 else "GPU 0" if gpus == 1 else "no GPU"
                raise ValueError(f"{flag}: expected a GPU of this machine in {piece!r}, got GPU {device} (this machine "
                                 f"has {have}); use cpu=SIZE and the disk for the rest")
        elif name in _MEMORY_DEVICES:
            device = name
        else:
            raise ValueError(f"{flag}: expected a device (a GPU index such as 0, or cpu, disk, mps) before '=' in "
                             f"{piece!r}, got {key!r}")
        m = _SIZE.fullmatch(size)
        if m is None:
            raise ValueError(f"{flag}: expected a size like 14GiB, 500MB or a byte count after '=' in {piece!r}, got "
                             f"{size!r}")
        if device in out:
            raise ValueError(f"{flag}: expected each device once, got {key!r} twice in {text!r}")
        out[device] = int(float(m.group(1)) * _UNITS[m.group(2).lower() if m.group(2) else None])
    return out


def offload_options(device_map: str | dict | None, max_memory=None, offload_dir=None):
    """Check --device_map, --max_memory and --offload_dir together: (device_map or None, max_memory dict or None,
    offload_dir or None). One-line ValueError for a combination that cannot work, naming the fix."""
    if isinstance(device_map, str) and device_map.lower() == "none":
        device_map = None
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ValueError(f"--device_map: expected one of {', '.join(DEVICE_MAPS)} or none, got {device_map!r}")
    max_memory = parse_max_memory(max_memory)
    if device_map is None:
        for flag, value in (("--max_memory", max_memory), ("--offload_dir", offload_dir)):
            if value:
                raise ValueError(f"{flag} needs --device_map (auto, balanced or sequential) to place the weights; "
                                 f"add --device_map auto")
        return None, None, None
    if offload_dir is not None:
        path = Path(offload_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"--offload_dir {offload_dir}: expected a folder for the offloaded weights, got a file")
        offload_dir = str(path)
    return device_map, max_memory, offload_dir


def _covering_key(device_map: dict, name: str) -> str | None:
    """The device map entry that places module `name` (itself or its closest ancestor)."""
    best = None
    for key in device_map:
        if key == name or key == "" or name.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    return best


def _pin(device_map: dict, model, name: str, device) -> bool:
    """Put module `name` on `device` in `device_map`, splitting the entry that covers it into its children (the
    others keep their device). True if it moved."""
    key = _covering_key(device_map, name)
    if key is None or device_map[key] == device:
        return False
    while key != name:
        where = device_map.pop(key)
        module = model.get_submodule(key)
        prefix = key + "." if key else ""
        for child, _ in module.named_children():
            device_map[prefix + child] = where
        for pname, _ in module.named_parameters(recurse=False):
            device_map[prefix + pname] = where
        for bname, _ in module.named_buffers(recurse=False):
            device_map[prefix + bname] = where
        key = _covering_key(device_map, name)
    device_map[name] = device
    return True


def _show_size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def main_device(device_map: dict):
    """Where an accelerate-dispatched model computes (accelerate's dispatch_model: the GPU in the map, else cpu);
    cpu and disk entries are offloaded there layer by layer."""
    gpus = [d for d in dict.fromkeys(device_map.values()) if d not in ("cpu", "disk")]
    return gpus[0] if gpus else "cpu"


def plan_device_map(config, dtype: str, device_map: str | dict, max_memory: dict | None,
                    device: str | torch.device = "cpu") -> tuple[dict, list[str]]:
    """The device map from_pretrained will use: accelerate's for the strategy (as transformers computes it, on an
    empty model), with the input embeddings (and weights tied to them) on the main device, where prompts enter.
    Returns (map, notes for the log). A map over several GPUs is refused (a prefix's keys and values live on one
    device); without `max_memory` on a machine with several GPUs, only `device`'s GPU (else GPU 0) is used."""
    from accelerate import init_empty_weights
    from accelerate.utils import find_tied_parameters, get_balanced_memory, get_max_memory, infer_auto_device_map
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    empty.tie_weights()  # as from_pretrained does before placing: tied weights must share a device
    notes = []
    if isinstance(device_map, str):
        no_split = list(getattr(empty, "_no_split_modules", None) or [])
        memory = dict(max_memory) if max_memory else None
        if memory is None and _gpu_count() > 1:
            device = torch.device(device)
            gpu = (device.index or 0) if device.type == "cuda" else 0
            memory = {k: v for k, v in get_max_memory(None).items() if not isinstance(k, int) or k == gpu}
        if device_map == "sequential":
            memory = get_max_memory(memory)
        else:
            memory = get_balanced_memory(empty, max_memory=memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
        plan = dict(infer_auto_device_map(empty, max_memory=memory, no_split_module_classes=no_split))
    else:
        plan = dict(device_map)
    gpus = sorted({d for d in plan.values() if d not in ("cpu", "disk")}, key=str)
    if len(gpus) > 1:
        raise ValueError(f"--device_map {device_map if isinstance(device_map, str) else 'given'} spreads the model "
                         f"over GPUs {', '.join(map(str, gpus))}, but a prefix's keys and values live on one device: "
                         "use one GPU plus cpu and disk offload, e.g. --max_memory 0=SIZE,cpu=SIZE")
    main = main_device(plan)
    embed = empty.get_input_embeddings()
    names = {id(m): n for n, m in empty.named_modules()}
    pinned = [names[id(embed)]]
    for group in find_tied_parameters(empty):  # weights tied to the embeddings (an LM head) follow them
        if any(p.rsplit(".", 1)[0] == pinned[0] for p in group):
            pinned += [p.rsplit(".", 1)[0] for p in group if p.rsplit(".", 1)[0] not in pinned]
    moved = [name for name in pinned if _pin(plan, empty, name, main)]
    if moved:
        weights = {id(p): p for name in moved for p in empty.get_submodule(name).parameters()}  # tied: counted once
        size = sum(p.numel() * p.element_size() for p in weights.values())
        notes.append(f"the input embeddings ({', '.join(moved)}, {_show_size(size)}) stay on {main}, where "
                     "prompts enter, beyond what --max_memory gives it")
    return plan, notes


def describe_device_map(device_map: dict) -> str:
    """'cpu: layers 0-3, model.embed_tokens; disk: layers 4-29, model.norm, lm_head' (decoder layers as ranges)."""
    by_device: dict = {}
    for name, device in device_map.items():
        by_device.setdefault(str(device), []).append(name)
    parts = []
    for device, names in by_device.items():
        layers, other = [], []
        for name in names:
            m = re.search(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)$", name)
            if m:
                layers.append(int(m.group(1)))
            else:
                other.append(name or "the whole model")
        spans: list[list[int]] = []
        for n in sorted(layers):
            if spans and n == spans[-1][1] + 1:
                spans[-1][1] = n
            else:
                spans.append([n, n])
        text = [f"layer {a}" if a == b else f"layers {a}-{b}" for a, b in spans] + other
        parts.append(f"{device}: {', '.join(text)}")
    return "; ".join(parts)


def load_offloaded(model, where, kwargs: dict, config, dtype: str, device_map, max_memory, offload_dir,
                   device, log=None):
    """from_pretrained with a device map planned by `plan_device_map`; arguments as `load_base` checked them."""
    from transformers import AutoModelForCausalLM

    shown = device_map if isinstance(device_map, str) else "(given)"
    plan, notes = plan_device_map(config, dtype, device_map, max_memory, device)
    on_disk = [name for name, d in plan.items() if d == "disk"]
    if on_disk and "gguf_file" in kwargs:
        raise ValueError(f"--device_map {shown} puts {len(on_disk)} modules on disk ({describe_device_map(plan)}), "
                         "but transformers cannot offload a GGUF model to disk: give --max_memory room for all of "
                         "it, or save it as a Hugging Face model folder (safetensors) and pass that as --model")
    if on_disk and offload_dir is not None:
        try:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--offload_dir {offload_dir}: cannot create the folder: {one_line(e)}") from e

    def load():
        try:
            return AutoModelForCausalLM.from_pretrained(where, config=config, dtype=DTYPES[dtype], device_map=plan,
                                                        offload_folder=offload_dir, output_loading_info=True,
                                                        **kwargs)
        except ValueError as e:  # transformers' and accelerate's words for a missing offload folder
            if on_disk and offload_dir is None and ("offload_folder" in str(e) or "offload_dir" in str(e)):
                raise ValueError(f"--device_map {shown} puts {len(on_disk)} modules on disk, and this checkpoint's "
                                 "weights must be written out for that (they are not plain safetensors): pass "
                                 "--offload_dir DIR (a folder with room for them), or give --max_memory more "
                                 "room") from e
            raise

    with load_report_held() as held:
        base, info = loading(model, "model weights", load)
    refuse_missing_weights(model, where, kwargs, base, info, held)
    base.eval().requires_grad_(False)
    first = next(base.parameters())
    if first.device.type == "meta":  # plan_device_map keeps the embeddings in place; anything else is a bug
        raise ValueError(f"--device_map {shown}: expected the input embeddings on {main_device(plan)}, got them "
                         "offloaded (on the meta device)")
    if log is not None:
        placed = describe_device_map(getattr(base, "hf_device_map", plan))
        log(f"device map {shown}: {placed}" + (f" (offload folder {offload_dir})" if on_disk and offload_dir else "")
            + "".join(f"; {n}" for n in notes))
    return base
