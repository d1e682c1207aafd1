"""The multi-task OpenAI-compatible server: `prefix_serve` / `python -m prefixtune.serve`.

    contract.py    EngineClient (the Protocol every engine implements), GenRequest, the errors, the shared checks
    sampling.py    the one sampler of every engine
    engine.py      the batched engine (many tasks in one batch)
    sequential.py  SequentialEngine: the same interface, one request at a time (the baseline)
    app.py         create_app(engine, tokenizer, base_id, options): the FastAPI app (vLLM's API surface)
    detok.py       incremental detokenization and stop strings
    protocol.py    request bodies (pydantic) and OpenAI-shaped errors
    metrics.py     Prometheus metrics
    server.py      uvicorn with a graceful SIGTERM drain; serve_in_thread for tests and benchmarks
    __main__.py    the command line
"""
__all__ = ["EngineClient", "EngineStopped", "GenRequest", "QueueFull", "UnknownTask"]


def __getattr__(name: str):
    """The names above load from contract.py on first use (it imports torch): `prefix_serve --help` answers from
    the parser alone, before torch loads (prefix/flags.py)."""
    if name in __all__:
        from . import contract

        return getattr(contract, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
