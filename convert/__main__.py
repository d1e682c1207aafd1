"""`python -m prefixtune.convert`: FasterTransformer export and verification, task management, PEFT and rinna interchange.

    python -m prefixtune.convert ft --model HF_DIR --prefix a.safetensors b.safetensors --out OUT --tp 2 --dtype fp16
    python -m prefixtune.convert verify OUT/2-gpu --model HF_DIR --prefix a.safetensors b.safetensors
    python -m prefixtune.convert tasks OUT/2-gpu
    python -m prefixtune.convert add OUT/2-gpu --prefix c.safetensors [--replace]
    python -m prefixtune.convert remove OUT/2-gpu --task b
    python -m prefixtune.convert triton OUT/2-gpu --repo triton_models
    python -m prefixtune.convert peft --prefix a.safetensors --out adapter_dir
    python -m prefixtune.convert from-peft adapter_dir --model HF_DIR --out a.safetensors
    python -m prefixtune.convert from-rinna smileface_suffix.task0.weight --model HF_DIR --task smileface --out s.safetensors
    python -m prefixtune.convert retask --prefix a.safetensors --task new_name [--out b.safetensors]
    python -m prefixtune.convert show --prefix a.safetensors
"""
from __future__ import annotations

import argparse
import sys

from ..prefix.errors import exits_on_error

ALLOW_OTHER_BASE = ("accept prefixes whose header base_model names another model than --model (shapes and "
                    "architecture are still checked); only when you know they fit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prefixtune.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ft", help="export a GPT-NeoX model and prefixes to OUT/<tp>-gpu")
    s.add_argument("--model", required=True, help="Hugging Face GPTNeoXForCausalLM folder")
    s.add_argument("--prefix", nargs="*", default=[], help="prefix .safetensors files, one task each")
    s.add_argument("--out", required=True, help="output folder; the export goes to OUT/<tp>-gpu")
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel size (GPUs per model instance, >= 1)")
    s.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="weight data type of the files")
    s.add_argument("--model_name", help="model_name in config.ini (default: the model folder's name)")
    s.add_argument("--force", action="store_true", help="replace an existing OUT/<tp>-gpu")
    s.add_argument("--allow_other_base", action="store_true", help=ALLOW_OTHER_BASE)
    s = sub.add_parser("verify", help="check an export's files and its logits against Hugging Face")
    s.add_argument("export_dir", help="OUT/<tp>-gpu")
    s.add_argument("--model", help="the Hugging Face model it was exported from (not needed with --files_only)")
    s.add_argument("--prefix", nargs="*", default=[], help="the prefix files of every task of the export")
    s.add_argument("--files_only", action="store_true", help="only check file names and sizes")
    s.add_argument("--allow_other_base", action="store_true", help=ALLOW_OTHER_BASE)
    s = sub.add_parser("tasks", help="list the tasks of an export and their ids")
    s.add_argument("export_dir")
    s = sub.add_parser("add", help="add prefixes to an export without rewriting the base weights")
    s.add_argument("export_dir")
    s.add_argument("--prefix", nargs="+", required=True)
    s.add_argument("--replace", action="store_true", help="overwrite tasks of the same name (they keep their ids)")
    s.add_argument("--allow_other_base", action="store_true",
                   help="accept prefixes whose header base_model names another model than the export's source "
                        "model (shapes and architecture are still checked)")
    s = sub.add_parser("remove", help="remove tasks from an export; other ids do not move")
    s.add_argument("export_dir")
    s.add_argument("--task", nargs="+", required=True)
    s = sub.add_parser("triton", help="write a Triton model repository for the fastertransformer backend")
    s.add_argument("export_dir")
    s.add_argument("--repo", required=True, help="model repository folder to create or update")
    s.add_argument("--name", default="fastertransformer", help="model name in the repository")
    s.add_argument("--max_batch_size", type=int, default=8)
    s = sub.add_parser("peft", help="write a prefix as a PEFT prefix-tuning adapter folder")
    s.add_argument("--prefix", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true", help="replace the adapter files of an existing --out")
    s = sub.add_parser("from-peft", help="import a PEFT prefix-tuning adapter as a prefix file")
    s.add_argument("adapter_dir")
    s.add_argument("--model", required=True, help="the adapter's base model (for shape checks and metadata)")
    s.add_argument("--task", help="task name (default: the adapter folder's name)")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s = sub.add_parser("from-rinna", help="import a rinna prefix-tuning-gpt .checkpoint tensor as a prefix file")
    s.add_argument("checkpoint")
    s.add_argument("--model", required=True, help="the base model it was trained on")
    s.add_argument("--task", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s = sub.add_parser("retask", help="rename the task of a prefix file (its header field task)")
    s.add_argument("--prefix", required=True)
    s.add_argument("--task", required=True, help="new task name: 1-64 letters, digits, '_', '-' or '.'; not 'base'")
    s.add_argument("--out", help="write here instead of rewriting --prefix in place")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s = sub.add_parser("show", help="print a prefix file's header (task, base model, shape, training arguments)")
    s.add_argument("--prefix", required=True)
    return p


@exits_on_error(ValueError, OSError)  # ExportError is a ValueError
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .ft_export import ExportError, add_tasks, export, list_tasks, remove_tasks

    if args.cmd == "ft":
        target = export(args.model, args.prefix, args.out, args.tp, args.dtype, args.force, args.model_name,
                        allow_other_base=args.allow_other_base)
        print(f"wrote {target}")
        for i, name, length in list_tasks(target):
            print(f"  task {i}: {name} (prefix length {length})")
    elif args.cmd == "verify":
        from .ft_verify import check_files, verify

        if args.files_only:
            problems = check_files(args.export_dir)
            for p in problems:
                print(f"FILE  {p}")
            print("files ok" if not problems else f"{len(problems)} file problem(s)")
            return 1 if problems else 0
        if not args.model:
            raise ExportError("verify needs --model (or --files_only)")
        ok = verify(args.export_dir, args.model, args.prefix, allow_other_base=args.allow_other_base)
        print("verified" if ok else "VERIFICATION FAILED")
        return 0 if ok else 1
    elif args.cmd == "tasks":
        for i, name, length in list_tasks(args.export_dir):
            print(f"{i}\t{name}\t{length}")
    elif args.cmd == "add":
        for i, name in add_tasks(args.export_dir, args.prefix, args.replace, args.allow_other_base):
            print(f"task {i}: {name}")
    elif args.cmd == "remove":
        remove_tasks(args.export_dir, args.task)
        print(f"removed {', '.join(args.task)}")
    elif args.cmd == "triton":
        from .triton import write_repository

        print(f"wrote {write_repository(args.export_dir, args.repo, args.name, args.max_batch_size)}")
    elif args.cmd == "peft":
        from .interchange import to_peft

        print(f"wrote {to_peft(args.prefix, args.out, args.overwrite)}")
    elif args.cmd == "from-peft":
        from .interchange import from_peft

        print(f"wrote {from_peft(args.adapter_dir, args.model, args.out, args.task, args.overwrite)}")
    elif args.cmd == "from-rinna":
        from .interchange import from_rinna

        print(f"wrote {from_rinna(args.checkpoint, args.model, args.out, args.task, args.overwrite)}")
    elif args.cmd == "retask":
        from ..prefix.tasks import rename_task as retask

        print(f"wrote {retask(args.prefix, args.task, args.out, args.overwrite)}")
    elif args.cmd == "show":
        import json

        from ..prefix.io import load_prefix

        print(json.dumps(load_prefix(args.prefix)[2], indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
