"""Training data: JSONL records, the smileface transform, the built-in demo set, split and batching."""
from .builtin import builtin_records
from .examples import IGNORE, SMILE, SplitReport, build_split, collate, epoch_order, record_examples, smileface_examples
from .jsonl import DataError, parse_record, read_jsonl

__all__ = ["IGNORE", "SMILE", "DataError", "SplitReport", "build_split", "builtin_records", "collate", "epoch_order", "parse_record",
           "read_jsonl", "record_examples", "smileface_examples"]
