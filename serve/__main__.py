"""`prefix_serve`: an OpenAI-compatible HTTP server over one frozen base model, where `model` picks a task (prefix).

    prefix_serve --prefix runs/smileface.safetensors runs/polite.safetensors --port 8000
    prefix_serve --model PATH --prefix_dir prefixes/ --api_key KEY      # DIR/<task>.safetensors load on first use
    prefix_serve --model PATH --device_map auto --max_memory 0=14GiB,cpu=30GiB --offload_dir off/   # a bigger base
    prefix_serve --model PATH --quantize int8                           # int8 base weights (torchao)
    python -m prefixtune.serve --help

Clients use any OpenAI SDK: client.completions.create(model="smileface", prompt=...); model = the base model's id
(see GET /v1/models) or "base" for no prefix. Tasks load and unload at run time with POST /v1/load_lora_adapter
{"lora_name", "lora_path"} and /v1/unload_lora_adapter {"lora_name"}. SIGTERM finishes the requests in flight,
answers new ones with 503, then exits.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("prefixtune.serve")


def build_parser() -> argparse.ArgumentParser:
    # flags.py imports no torch: --help answers at once, and torch loads in build() (after parsing)
    from ..prefix.flags import add_device_flag, add_offload_flags, add_quantize_flag
    from .limits import CHARS_PER_POSITION, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_LORAS

    p = argparse.ArgumentParser(prog="prefix_serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", "--pretrained_model_dir", dest="model", default=None,
                   help="base model: HF folder or hub name, a .gguf file, or 'smollm2' (default: the base_model "
                        "stored in the --prefix files, else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prefix", nargs="*", default=[], metavar="FILE",
                   help="prefix .safetensors files, one task each, named by their header field task")
    p.add_argument("--prefix_dir", default=None, metavar="DIR",
                   help="folder of prefix files: a request for model NAME loads DIR/NAME.safetensors on first use "
                        "(checked against the base like --prefix)")
    p.add_argument("--load_from", nargs="*", default=[], metavar="DIR",
                   help="folders whose prefix files POST /v1/load_lora_adapter may load, besides --prefix_dir "
                        "(a lora_path anywhere else is refused with 403; without either, loading by path is off)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api_key", "--api-key", dest="api_key", default=os.environ.get("PREFIX_SERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PREFIX_SERVE_API_KEY; unset = "
                        "no key)")
    p.add_argument("--served_model_name", "--served-model-name", dest="served_model_name", default=None,
                   help="the base model's id in the API (default: --model as given, else the prefixes' "
                        "base_model, else 'smollm2')")
    p.add_argument("--engine", choices=["auto", "batched", "sequential"], default="auto",
                   help="batched: serve/engine.py (many tasks in one batch); sequential: one request at a time "
                        "(the baseline); auto: batched when serve/engine.py exists")
    p.add_argument("--max_batch_size", type=int, default=16, help="most requests the batched engine runs at once")
    p.add_argument("--max_queue", type=int, default=256,
                   help="most requests waiting for a batch slot; past it requests get 429")
    p.add_argument("--route", default="auto",
                   help="the batched engine's route: auto, paged (transformers' continuous batching) or padded (see "
                        "serve/engine.py); the sequential engine ignores it")
    p.add_argument("--max_model_len", "--max-model-len", dest="max_model_len", type=int, default=None,
                   help="most positions per request, prefix + prompt + max_tokens (default and upper bound: the "
                        "model's own)")
    p.add_argument("--chat_template", "--chat-template", dest="chat_template", default=None,
                   help="Jinja chat template for /v1/chat/completions, for a tokenizer without one or to replace it: "
                        "an existing file, else the template itself (a value with no '{', '}' or newline that is no "
                        "file is an error)")
    p.add_argument("--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help="largest request body in bytes (default 4 MiB): a larger Content-Length is answered 413 "
                        "before the body is read, a chunked body as soon as it passes N")
    p.add_argument("--max_prompt_chars", type=int, default=None, metavar="N",
                   help="most characters in a prompt (for chat: the messages, and the formatted chat), checked "
                        f"before tokenising; past it a 400 (default: {CHARS_PER_POSITION} per position of the "
                        "context, as no tokenizer packs more into one token in practice)")
    p.add_argument("--max_loras", "--max-loras", dest="max_loras", type=int, default=DEFAULT_MAX_LORAS, metavar="N",
                   help="most tasks loaded at once: --prefix files, --prefix_dir tasks once used and "
                        "load_lora_adapter together; loading one more is a 400 naming this flag (default 64)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="precision of the base model; auto: bf16 on GPUs that have it, else fp16 on GPUs, fp32 on "
                        "CPUs")
    add_device_flag(p)
    add_offload_flags(p)  # --device_map, --max_memory, --offload_dir: as prefix_inference's
    add_quantize_flag(p)  # --quantize none/int8/int4 (torchao), bnb-8bit/bnb-4bit/gptq (CUDA)
    p.add_argument("--allow_other_base", action="store_true",
                   help="serve prefixes trained on another base_model than the one served (shapes are still "
                        "checked)")
    p.add_argument("--drain_timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight before exiting")
    p.add_argument("--log_level", choices=["debug", "info", "warning", "error"], default="info",
                   help="log level of the server and of uvicorn's access log")
    return p


def engine_class(name: str):
    from .sequential import SequentialEngine

    if name == "sequential":
        return SequentialEngine
    from .engine import Engine

    return Engine


def _dtype(name: str, device: str) -> str:
    import torch

    if name != "auto":
        return name
    if str(device).startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def build(args, engine_cls=None):
    """Load the base model and --prefix files and build the app: (app, engine). One-line ValueError or
    FileNotFoundError on anything refused."""
    import torch

    from ..prefix.base import load_base, load_config
    from ..prefix.flags import default_device
    from ..prefix.io import check_prefixes, choose_model
    from ..prefix.offload import offload_options
    from ..prefix.tasks import RENAME, load_prefixes, task_of
    from .app import ServeOptions, create_app

    args.device = getattr(args, "device", None) or default_device()
    for flag in ("max_batch_size", "max_queue", "port"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise ValueError(f"expected --{flag} of at least 1, got {getattr(args, flag)}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(f"expected --max_model_len of at least 2, got {args.max_model_len}")
    if args.prefix_dir is not None and not Path(args.prefix_dir).is_dir():
        raise FileNotFoundError(f"--prefix_dir {args.prefix_dir}: no such folder")
    for flag in ("max_body_bytes", "max_prompt_chars", "max_loras"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"expected --{flag} of at least 1, got {getattr(args, flag)}")
    template = chat_template_text(args.chat_template) if args.chat_template else None
    if args.api_key and not args.api_key.isascii():
        log.warning("--api_key has non-ASCII characters: clients must send it UTF-8 encoded (curl does; the openai "
                    "SDK and other httpx/requests clients only send ASCII or latin-1 header values)")
    device_map, max_memory, offload_dir = offload_options(getattr(args, "device_map", None),
                                                          getattr(args, "max_memory", None),
                                                          getattr(args, "offload_dir", None))
    loaded = load_prefixes(args.prefix)
    if len(loaded) > args.max_loras:
        raise ValueError(f"--prefix gives {len(loaded)} tasks, more than --max_loras {args.max_loras} allows; "
                         "raise --max_loras")
    model = choose_model(args.model, loaded)
    config = load_config(model)
    for warning in check_prefixes(loaded, config, model, args.model is not None, args.allow_other_base):
        log.warning("%s", warning)
    computes_on = args.device  # with --device_map: the GPU when it gets one (as accelerate places it), else cpu
    if device_map is not None:
        computes_on = "cuda" if torch.cuda.is_available() and (max_memory is None or any(
            isinstance(k, int) for k in max_memory)) else "cpu"
    base, tok, display = load_base(model, _dtype(args.dtype, computes_on), args.device, config=config,
                                   device_map=device_map, max_memory=max_memory, offload_dir=offload_dir,
                                   log=log.info, quantize=getattr(args, "quantize", "none"))
    if template is not None:
        tok.chat_template = template
    base_id = args.served_model_name or (args.model if args.model is not None else display)
    engine = (engine_cls or engine_class(args.engine))(base, tok, max_batch_size=args.max_batch_size,
                                                       max_queue=args.max_queue, route=args.route)
    sources = {}
    for path, (table, shape, meta) in loaded:
        name = task_of(path, meta)
        if name == base_id:
            raise ValueError(f"--prefix {path}: task {name!r} is the base model's id; rename the task: "
                             + RENAME.format(path=path))
        engine.add_task(name, table, shape)
        sources[name] = str(path)
    eos = {tok.eos_token_id} | set(_as_list(getattr(getattr(base, "generation_config", None), "eos_token_id", None)))
    options = ServeOptions(model_ref=model, config=config, api_key=args.api_key or None, prefix_dir=args.prefix_dir,
                           load_from=tuple(args.load_from),
                           allow_other_base=args.allow_other_base, max_model_len=args.max_model_len,
                           drain_timeout=args.drain_timeout,
                           stop_token_ids=tuple(sorted(int(t) for t in eos if t is not None)),
                           vocab_size=base.get_input_embeddings().num_embeddings, sources=sources,
                           max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
                           max_loras=args.max_loras)
    return create_app(engine, tok, base_id, options), engine


def chat_template_text(value: str) -> str:
    """--chat_template's template: the file it names if that is an existing file (a value too long for a path, or
    with a newline, is not looked up), else the value itself when it looks like Jinja ('{', '}' or a newline), else
    a ValueError (a file name with a typo must not become a template that prints the name)."""
    if len(value) <= 4096 and "\n" not in value:
        path = Path(value).expanduser()
        try:
            is_file = path.is_file()
        except (OSError, ValueError):  # a name too long for a path, a NUL: no file
            is_file = False
        if is_file:
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"--chat_template {value}: cannot read it as UTF-8 text: {e}") from None
    if any(c in value for c in "{}\n"):
        return value
    raise ValueError(f"--chat_template {value}: no such file, and not a Jinja template either (it has no '{{', "
                     "'}' or newline); give an existing file or the template itself")


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # first: --help and a bad flag answer before torch and the web stack load
    import uvicorn

    from ..prefix.errors import one_line
    from .server import PrefixServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .threads import in_passing_thread

    try:
        app, engine = in_passing_thread(build, args)  # model loading leaves no OpenMP pool behind (engine.py)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    state = app.state.serve
    log.info("serving %s (%s engine) with tasks: %s on http://%s:%d", state.base_id, type(engine).__name__,
             ", ".join(engine.tasks()) or "none", args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, lifespan="on")
    PrefixServer(config, drain_timeout=args.drain_timeout).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
