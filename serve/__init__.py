"""The multi-task OpenAI-compatible server: `prefix_serve` / `python -m prefixtune.serve`.

    types.py       GenRequest, QueueFull, UnknownTask, EngineStopped: what the HTTP layer and an engine exchange
    engine.py      the batched engine (many tasks in one batch)
    sequential.py  SequentialEngine: the same interface, one request at a time (the baseline)
    app.py         create_app(engine, tokenizer, base_id, options): the FastAPI app (vLLM's API surface)
    detok.py       incremental detokenization and stop strings
    protocol.py    request bodies (pydantic) and OpenAI-shaped errors
    metrics.py     Prometheus metrics
    server.py      uvicorn with a graceful SIGTERM drain; serve_in_thread for tests and benchmarks
    __main__.py    the command line
"""
from .types import EngineStopped, GenRequest, QueueFull, UnknownTask

__all__ = ["EngineStopped", "GenRequest", "QueueFull", "UnknownTask"]
