"""The prefix file: one self-describing safetensors file, and atomic writes for every file the project makes.

    tensor  "prefix"  float32 [P, L*2*H_kv*D], element order (position, layer, key/value, head, head_dim)
    header  format, format_version, task, base_model, architecture, num_layers, num_kv_heads, head_dim,
            prefix_len, train_args (JSON)

The order is the one rinna's prefix-tuning-gpt and PEFT use, so a table moves between them with a reshape.
Files are read with safetensors only, never unpickled. `check_base_model` decides whether a prefix may run on a
given --model (inference, resume); `python -m prefixtune.convert retask` renames a task.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _safetensors_bytes

from .errors import one_line
from .resolve import DEFAULT_MODEL, default_model_file, is_default_model
from .shapes import PrefixShape, base_dims

FORMAT = "prefixtune"
FORMAT_VERSION = "1"
SHAPE_KEYS = ("num_layers", "num_kv_heads", "head_dim")


def current_umask() -> int:
    """The process's umask, read without changing it (/proc/self/status, Linux 4.7+). Elsewhere it is swapped for
    a restrictive one and put back at once: a file another thread creates meanwhile is private, never too open."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask (mkstemp and safetensors give 0600 whatever it is)."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes. The temporary (so the
    file) has the mode a plain open() would give it, honouring the umask: a server or Triton process of another
    user can read what the umask lets it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_file(tensors: dict, filename, metadata: dict | None = None) -> None:
    """safetensors' save_file for small files (prefix tables, adapters), written by this process into `filename`
    itself: safetensors 0.8 writes a hidden `.tmpXXXXXX` beside the target (mode 0600, whatever the umask) and
    renames it over, so a kill -9 mid-write would leave a name that no cleanup here knows. Callers pass an
    `atomic_path` temporary; a new file gets open()'s mode."""
    data = _safetensors_bytes(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data)


def save_prefix(path, table: torch.Tensor, shape: PrefixShape, *, task: str, base_model: str, architecture: str,
                train_args: dict | None = None) -> None:
    if tuple(table.shape) != (shape.prefix_len, shape.width):
        raise ValueError(f"prefix table has shape {tuple(table.shape)}, expected {(shape.prefix_len, shape.width)}")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": task,
        "base_model": str(base_model),
        "architecture": architecture,
        **{k: str(v) for k, v in shape.as_dict().items()},
        "train_args": json.dumps(train_args or {}, default=str),
    }
    with atomic_path(path) as tmp:
        save_file({"prefix": table.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)


def _unreadable(path: Path, e: BaseException) -> ValueError:
    """Why a file is not a readable safetensors file, in one line: a pickle, truncated, or corrupt."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        size = path.stat().st_size
    except OSError:
        head, size = b"", -1
    if size == 0:
        what = "the file is empty"
    elif head.startswith(b"PK\x03\x04"):
        what = "it is a zip archive (a torch.save checkpoint?), which prefixtune never unpickles"
    elif head[:1] == b"\x80":
        what = "it is a Python pickle (a torch.save checkpoint?), which prefixtune never unpickles"
    elif (size < 8 or "not fully covered" in str(e) or "incomplete metadata" in str(e)
          or 8 + int.from_bytes(head, "little") > size and int.from_bytes(head, "little") < 100_000_000):
        # a safetensors file is an 8-byte header length, the JSON header, then the data: any of it cut off
        what = "it is truncated (an interrupted copy or download?)"
    else:
        what = one_line(e)
    return ValueError(f"{path}: not a readable safetensors file ({what}); expected a prefix file written by "
                      "prefixtune: copy it again, or import a rinna/PEFT checkpoint with python -m prefixtune.convert "
                      "from-rinna/from-peft")


def _header_shape(path: Path, meta: dict) -> PrefixShape:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: header field format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                         f"(expected {FORMAT_VERSION!r}); upgrade prefixtune")
    values = []
    for k in (*SHAPE_KEYS, "prefix_len"):
        if k not in meta:
            raise ValueError(f"{path}: header lacks the field {k!r}; is this a prefixtune prefix file?")
        try:
            values.append(int(meta[k]))
        except ValueError:
            raise ValueError(f"{path}: header field {k} is {meta[k]!r}, expected a whole number") from None
    shape = PrefixShape(*values)
    if min(shape.as_dict().values()) < 1:
        raise ValueError(f"{path}: header gives a dimension below 1: {shape.as_dict()}")
    return shape


def load_prefix(path, check: Callable[[PrefixShape, dict], None] | None = None
                ) -> tuple[torch.Tensor, PrefixShape, dict]:
    """Read and check a prefix file: (table [P, width] fp32, shape, metadata). Every error is a one-line
    FileNotFoundError or ValueError that names the file. The file is never unpickled, and the tensor is read only
    once the header and the tensor's declared shape agree and `check(shape, meta)` (the caller's test against its
    base; meta["train_args"] still a string) has passed: a wrong or huge file costs a header read, not its size."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prefix file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path}: expected a prefix .safetensors file, got a folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if "prefix" not in keys:
                raise ValueError(f"{path}: no tensor 'prefix' (found {keys}); is this a prefixtune prefix file?")
            shape = _header_shape(path, meta)
            stored = tuple(f.get_slice("prefix").get_shape())
            if stored != (shape.prefix_len, shape.width):
                raise ValueError(f"{path}: tensor 'prefix' has shape {stored}, "
                                 f"but the header says {(shape.prefix_len, shape.width)}")
            if check is not None:
                check(shape, meta)
            table = f.get_tensor("prefix").float()
    except (OSError, RuntimeError, SafetensorError) as e:
        raise _unreadable(path, e) from e
    if not torch.isfinite(table).all():
        raise ValueError(f"{path}: expected finite numbers, got NaN or infinity in tensor 'prefix' "
                         "(did training diverge?); use an earlier prefix or retrain with a lower --max_lr")
    try:
        meta["train_args"] = json.loads(meta.get("train_args") or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: header field train_args is not valid JSON ({e.msg})") from None
    return table, shape, meta


def _canonical_model(model) -> str:
    """--model / base_model -> what identifies it: the resolved path of a local file or folder (the default's
    GGUF file for 'smollm2', None or ''), else the string itself (a hub name)."""
    if is_default_model(model):
        try:
            return str(default_model_file().resolve())
        except FileNotFoundError:
            return DEFAULT_MODEL
    path = Path(str(model)).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def same_base_model(a, b) -> bool:
    """Whether two --model values (or saved base_model fields) name the same model: resolved absolute paths when
    both exist, else the strings; None, '' and 'smollm2' all mean the embedded default."""
    return _canonical_model(a) == _canonical_model(b)


def check_base_model(path, meta: dict, model_name, allow_other: bool = False,
                     flag: str = "--allow_other_base") -> bool:
    """Compare the prefix's saved base_model with the model about to run it (`model_name`, as given to --model;
    None = the embedded default). True if they are the same; False if not but `allow_other`; else a one-line
    ValueError naming both and `flag`."""
    trained = meta.get("base_model")
    if same_base_model(trained, model_name):
        return True
    if allow_other:
        return False
    shown_trained = DEFAULT_MODEL if is_default_model(trained) else trained
    shown = f"--model {model_name}" if not is_default_model(model_name) else f"the embedded default ({DEFAULT_MODEL})"
    raise ValueError(f"{path} was trained on base model {shown_trained}, got {shown}: pass --model {shown_trained} "
                     f"(or leave --model out to use it), or pass {flag} to run it on this model anyway")


def check_compatible(path, shape: PrefixShape, meta: dict, config) -> None:
    """Raise a ValueError naming every dimension where the prefix does not fit the base model `config`."""
    have = dict(zip(SHAPE_KEYS, base_dims(config)))
    bad = [f"{k}: prefix has {getattr(shape, k)}, base model has {have[k]}" for k in SHAPE_KEYS if getattr(shape, k) != have[k]]
    if bad:
        raise ValueError(
            f"{path} was trained on {meta.get('base_model')} ({meta.get('architecture')}) and does not fit this base "
            f"model ({getattr(config, 'model_type', '?')}): " + "; ".join(bad) + ". Load it with the model it was trained on."
        )


def choose_model(model: str | None, loaded: list[tuple[str, tuple]]) -> str | None:
    """The base model to load: --model if given, else the one all prefixes were trained on (their base_model)."""
    if model is not None or not loaded:
        return model
    first_path, (_, _, first) = loaded[0]
    for path, (_, _, meta) in loaded[1:]:
        if not same_base_model(first.get("base_model"), meta.get("base_model")):
            raise ValueError(f"--prefix {first_path} was trained on {first.get('base_model') or 'smollm2'} but {path} "
                             f"on {meta.get('base_model') or 'smollm2'}, and one run has one base model: pass "
                             "--model M (with --allow_other_base for prefixes trained on another model), or run "
                             "them separately")
    return first.get("base_model") or None


def check_prefixes(loaded: list[tuple[str, tuple]], config, model: str | None, given: bool,
                   allow_other: bool) -> list[str]:
    """Every prefix fits the model's shape (no flag overrides that) and, when --model was given, was trained on
    it (--allow_other_base overrides that). Returns a warning per prefix that runs on another base."""
    warnings = []
    for path, (_, shape, meta) in loaded:
        check_compatible(path, shape, meta, config)
    if given:
        for path, (_, _, meta) in loaded:
            if not check_base_model(path, meta, model, allow_other):
                warnings.append(f"{path} was trained on {meta.get('base_model') or 'smollm2'}; running it on "
                                f"{model} (--allow_other_base)")
    return warnings
