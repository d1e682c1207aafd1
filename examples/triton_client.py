"""Ask a Triton/FasterTransformer GPT-NeoX deployment for a completion with the prefix of a task chosen by name.

    pip install "tritonclient[http]"        # optional: only this example needs it
    python examples/triton_client.py --tasks triton_models/fastertransformer/tasks.json --task smileface \
        --model_dir HF_DIR --prompt "The for statement"

The task is checked against the export's live config.ini (the folder config.pbtxt names as model_checkpoint_path,
or --export where the client sees it elsewhere): a task removed since the repository was written, or whose id
moved, is refused with the command that brings the repository up to date, rather than served as the base model.
"""
import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="localhost:8000")
    p.add_argument("--model", default="fastertransformer", help="model name in the Triton repository")
    p.add_argument("--tasks", required=True, help="tasks.json in the Triton model folder (task name -> id)")
    p.add_argument("--task", help="task name; none or 'base' = the base model")
    p.add_argument("--export", help="the FT export folder (default: model_checkpoint_path of the config.pbtxt "
                                    "beside --tasks)")
    p.add_argument("--model_dir", required=True, help="Hugging Face folder with the tokenizer")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=int, default=64)
    a = p.parse_args(argv)

    from prefixtune.convert.export_dir import ExportError
    from prefixtune.convert.triton import task_id

    task = None
    if a.task not in (None, "base"):
        try:
            task = task_id(a.tasks, a.task, a.export)
        except ExportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1  # the project's exit status for a refused input (argparse's usage errors: 2)

    import tritonclient.http as http
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    ids = np.array([tok(a.prompt, add_special_tokens=False)["input_ids"]], dtype=np.uint32)
    inputs = {"input_ids": ids, "input_lengths": np.array([[ids.shape[1]]], dtype=np.uint32),
              "request_output_len": np.array([[a.max_new_tokens]], dtype=np.uint32)}
    if task is not None:
        inputs["prompt_learning_task_name_ids"] = np.array([[task]], dtype=np.uint32)
    client = http.InferenceServerClient(a.url)
    reqs = []
    for name, arr in inputs.items():
        t = http.InferInput(name, arr.shape, "UINT32")
        t.set_data_from_numpy(arr)
        reqs.append(t)
    out = client.infer(a.model, reqs).as_numpy("output_ids")
    print(tok.decode(out[0, 0, ids.shape[1]:], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
