"""`prefix_inference`: the interactive REPL (switch prefixes live) and batch generation over JSONL, a front-end
beside serve/. Batch mode runs its prompts through the serving engine, so prompts of many tasks share batches."""
