"""Ask a Triton/FasterTransformer GPT-NeoX deployment for a completion with the prefix of a task chosen by name.

    pip install "tritonclient[http]"        # optional: only this example needs it
    python examples/triton_client.py --tasks triton_models/fastertransformer/tasks.json --task smileface \
        --model_dir HF_DIR --prompt "The for statement"
"""
import argparse
import json

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="localhost:8000")
    p.add_argument("--model", default="fastertransformer", help="model name in the Triton repository")
    p.add_argument("--tasks", required=True, help="tasks.json of the export (task name -> id)")
    p.add_argument("--task", help="task name; none = the base model")
    p.add_argument("--model_dir", required=True, help="Hugging Face folder with the tokenizer")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=int, default=64)
    a = p.parse_args()

    import tritonclient.http as http
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    ids = np.array([tok(a.prompt, add_special_tokens=False)["input_ids"]], dtype=np.uint32)
    inputs = {"input_ids": ids, "input_lengths": np.array([[ids.shape[1]]], dtype=np.uint32),
              "request_output_len": np.array([[a.max_new_tokens]], dtype=np.uint32)}
    if a.task:
        task_ids = json.load(open(a.tasks, encoding="utf-8"))
        if a.task not in task_ids:
            raise SystemExit(f"task {a.task!r} is not served; served: {', '.join(task_ids)}")
        inputs["prompt_learning_task_name_ids"] = np.array([[task_ids[a.task]]], dtype=np.uint32)
    client = http.InferenceServerClient(a.url)
    reqs = []
    for name, arr in inputs.items():
        t = http.InferInput(name, arr.shape, "UINT32")
        t.set_data_from_numpy(arr)
        reqs.append(t)
    out = client.infer(a.model, reqs).as_numpy("output_ids")
    print(tok.decode(out[0, 0, ids.shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()
