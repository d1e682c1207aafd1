"""A GGUF base converted once into a plain Hugging Face folder, so that later runs load it in a second.

transformers parses a GGUF file three times per run (config, tokenizer, weights) and dequantizes every tensor in
Python: 14 s for the embedded SmolLM2-135M on a 2-core CPU, paid by every training rank, every REPL and every server
start. The first load writes the dequantized weights (safetensors), the config and the tokenizer to
`$PREFIXTUNE_CACHE` (default `~/.cache/prefixtune`) under a name keyed by the file's path, size and modification time;
a changed file gets a new folder. One folder per GGUF file serves every dtype: the weights are stored as the GGUF route
dequantizes them (fp32; a tensor that fp16 or bf16 holds exactly is stored in it) and cast on load, which gives what
loading the GGUF file in that dtype gives (training in bf16 and then serving in fp32 converts once). The folder is laid
out as save_pretrained writes it (a tied weight under `model.embed_tokens.weight`), so other loaders read it too. It
appears by an atomic rename, under a lock, so ranks that start together convert once; a GGUF file whose weights are
missing is refused before anything is written. Where the cache cannot be written, loading goes on from the GGUF file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .io import current_umask
from .weights import save_plain_model

ENV = "PREFIXTUNE_CACHE"
LAYOUT = "2"  # 1: one folder per dtype, a tied weight stored as lm_head.weight; 2: one folder, as save_pretrained


def cache_root() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefixtune"


def cached_folder(where: str, kwargs: dict) -> Path:
    """Where the converted copy of the GGUF file `where`/`kwargs['gguf_file']` lives (or will), for every dtype."""
    path = (Path(where) / kwargs["gguf_file"]).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|{LAYOUT}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def lookup(where: str, kwargs: dict) -> tuple[str, dict]:
    """(where, kwargs) of the converted folder if it exists, else the GGUF file's own."""
    if "gguf_file" not in kwargs:
        return where, kwargs
    try:
        folder = cached_folder(where, kwargs)
    except OSError:
        return where, kwargs
    return (str(folder), {}) if _complete(folder) else (where, kwargs)


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def convert(where: str, kwargs: dict, load) -> bool:
    """Write the converted folder if missing: `load()` gives (model in fp32, tokenizer), and raises (nothing is
    written) for a file whose weights are missing. False if the folder cannot be written. (The GGUF route
    dequantizes to fp32 and casts: the fp32 copy, cast on load, gives exactly what it would load in any dtype.)"""
    import fcntl

    try:
        folder = cached_folder(where, kwargs)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another rank converting: wait for it, then find its folder
            if _complete(folder):
                return True
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete copy (an older writer's): write it again
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            try:
                model, tok = load()
                save_plain_model(model, tok, tmp, narrow=True)
                os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp made it 0700
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return True
    except OSError:
        return False
