"""A GGUF base converted once into a plain Hugging Face folder, so that later runs load it in a second.

transformers parses a GGUF file three times per run (config, tokenizer, weights) and dequantizes every tensor in
Python: 14 s for the embedded SmolLM2-135M on a 2-core CPU, paid by every training rank, every REPL and every server
start. The first load writes the dequantized weights in the dtype asked for (safetensors), the config and the tokenizer to
`$PREFIXTUNE_CACHE` (default `~/.cache/prefixtune`) under a name keyed by the file's path, size and modification time;
a changed file gets a new folder. The folder appears by an atomic rename, under a lock, so ranks that start together
convert once. Where the cache cannot be written, loading goes on from the GGUF file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

ENV = "PREFIXTUNE_CACHE"


def cache_root() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefixtune"


def cached_folder(where: str, kwargs: dict, dtype: str) -> Path:
    """Where the converted copy of the GGUF file `where`/`kwargs['gguf_file']`, in `dtype`, lives (or will)."""
    path = (Path(where) / kwargs["gguf_file"]).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}-{dtype}"


def lookup(where: str, kwargs: dict, dtype: str | None = None) -> tuple[str, dict]:
    """(where, kwargs) of the converted folder in `dtype` (None: any) if it exists, else the GGUF file's own."""
    if "gguf_file" not in kwargs:
        return where, kwargs
    try:
        if dtype is None:  # config and tokenizer: any converted copy has them
            found = [cached_folder(where, kwargs, d) for d in ("fp32", "bf16", "fp16")]
            folder = next((f for f in found if _complete(f)), found[0])
        else:
            folder = cached_folder(where, kwargs, dtype)
    except OSError:
        return where, kwargs
    return (str(folder), {}) if _complete(folder) else (where, kwargs)


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def convert(where: str, kwargs: dict, dtype: str, load) -> bool:
    """Write the converted folder if missing: `load()` gives (model in `dtype`, tokenizer). False if it cannot be
    written. (The GGUF route dequantizes to fp32 and casts: a 16-bit copy holds exactly what it would load.)"""
    import fcntl

    from .base import save_plain_model

    try:
        folder = cached_folder(where, kwargs, dtype)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another rank converting: wait for it, then find its folder
            if _complete(folder):
                return True
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete copy (an older writer's): write it again
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            try:
                model, tok = load()
                save_plain_model(model, tok, tmp)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return True
    except OSError:
        return False
