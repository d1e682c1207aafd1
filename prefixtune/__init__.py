"""prefixtune: prefix tuning for frozen causal LMs, with prefixes that deploy.

The code lives in the repository's top-level folders, installed under this one name so that no folder of a
user's working directory (most ML folders have a `data/`) can shadow it:

    prefixtune.prefix   <- prefix/   encoder, attention hook, model wrapper, file format, generation, REPL
    prefixtune.train    <- train/    arguments, DeepSpeed config, training loop, resume state, demo
    prefixtune.data     <- data/     JSONL records, smileface, the built-in data
    prefixtune.convert  <- convert/  FasterTransformer export and verification, Triton, PEFT/rinna interchange
    prefixtune.serve    <- serve/    the OpenAI-compatible multi-task server (prefix_serve)

`train` is also installed under its own name, only so that `deepspeed --module train` (the launcher's spelling of
`python -m train`) keeps working; `python -m prefixtune.train` is the same program.
"""

import logging as _logging


class _KnownNoise(_logging.Filter):
    """Lines torchao's import prints on every start when it is installed (transformers imports it): its CUDA
    extensions failing to load on a CPU-only torch, and torch's deprecation of its Enum registrations. Harmless."""

    def filter(self, record: _logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not ((msg.startswith("Failed to load") and "torchao" in msg and "_C" in msg)
                    or "is an Enum subclass and is now natively supported" in msg)


for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).addFilter(_KnownNoise())
