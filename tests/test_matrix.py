"""Every configuration the trainer accepts trains, saves the fp32 master prefix, and resumes onto the same loss
curve -- or is refused up front with a reason.

The full product (ZeRO 0/1/2/3 x fp32/fp16/bf16 x offload x checkpointing x 1/2 processes) is 96 runs of runs;
the cases below cover every value and every pair where a bug hid (ZeRO-0 with 16-bit masters, ZeRO-3 resume and
evaluation, offload with each stage). Each case trains 7 steps once, copying its outputs aside when step 4's
state is saved, then resumes that copy: both runs must give the same metrics, the same prefix, and that prefix
must be the table of the fp32 master weights in the state.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import curve, run, train_with_fault
from safetensors.torch import load_file

from prefixtune.prefix import PrefixEncoder
from prefixtune.prefix.io import load_prefix
from prefixtune.train.ds_config import unsupported_precision

TINY = ["--max_seq_len", 32, "--prefix_seq_len", 4, "--prefix_input_dim", 16, "--prefix_hidden_dim", 16,
        "--dev_data_size", 9, "--batch_size", 2, "--log_every", 1, "--max_lr", 1e-2, "--n_warmup_steps", 2,
        "--max_steps", 7, "--eval_every", 2, "--prefix_dropout", 0.1]

# (zero stage, precision, offload, checkpointing, processes)
CASES = [
    (0, "fp32", False, False, 1),
    (0, "bf16", False, False, 1),  # DeepSpeed's ZeRO-0 16-bit optimizer hides its fp32 masters
    (0, "fp16", False, True, 1),  # rinna's reference configuration
    (1, "bf16", False, False, 1),
    (1, "fp32", True, False, 1),
    (2, "fp32", False, True, 1),
    (2, "fp16", True, False, 1),
    (2, "bf16", True, True, 2),  # the README demo's configuration
    (3, "fp32", False, False, 1),
    (3, "bf16", True, True, 1),
    (3, "bf16", False, False, 2),  # 9 dev examples over 2 ranks: uneven shards, and ZeRO-3 forwards are collective
]


def case_id(c):
    stage, prec, offload, ckpt, procs = c
    return f"zero{stage}-{prec}{'-offload' if offload else ''}{'-ckpt' if ckpt else ''}-{procs}proc"


def flags_of(stage, prec, offload, ckpt):
    return ["--zero_stage", stage, "--precision", prec, *(["--offload"] if offload else []),
            *(["--gradient_checkpointing"] if ckpt else [])]


def master_table(state_dir, prefix_path):
    """The prefix table recomputed from the fp32 encoder weights in a training state."""
    tensors = load_file(str(state_dir / "encoder.safetensors"))
    _, shape, meta = load_prefix(prefix_path)
    args = meta["train_args"]
    enc = PrefixEncoder(shape, args["prefix_input_dim"], args["prefix_hidden_dim"], 0.0)
    enc.load_state_dict({k.removeprefix("encoder."): v for k, v in tensors.items()})
    with torch.no_grad():
        return enc.eval()()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_trains_saves_the_master_prefix_and_resumes_exactly(case, tiny_llama_dir, text_jsonl, tmp_path):
    stage, prec, offload, ckpt, procs = case
    why = unsupported_precision(prec)
    if why:
        pytest.skip(f"this machine cannot train in {prec}: {why.split(':')[0]}; "
                    "test_unsupported_precision_is_refused_up_front covers the refusal")
    common = ["--model", tiny_llama_dir, "--data", text_jsonl, *TINY, *flags_of(stage, prec, offload, ckpt),
              "--save_name", "p"]
    if stage == 3:  # partition every parameter: by default DeepSpeed keeps tensors under 1e5 values whole
        cfg = tmp_path / "zero3.json"
        cfg.write_text('{"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}')
        common += ["--deepspeed_config", cfg]
    port = 29700 + 10 * CASES.index(case)
    full = train_with_fault(*common, "--save_dir", tmp_path / "a", processes=procs, port=port,
                            fault={"snapshot_after_step": 4, "to": str(tmp_path / "b")})
    assert f"{procs} process(es), {prec}, ZeRO-{stage}" in full.stdout
    again = train_with_fault(*common, "--save_dir", tmp_path / "b", "--resume", processes=procs, port=port + 1)
    assert "resumed at step 4" in again.stdout
    a, b = curve(tmp_path / "a" / "p.metrics.jsonl"), curve(tmp_path / "b" / "p.metrics.jsonl")
    assert [r[0] for r in a] == list(range(8)) and [r[0] for r in b] == [r[0] for r in a]
    assert len({r[1] for r in a[1:]}) > 1  # the curve moves, so equality means something
    for ra, rb in zip(a, b):
        assert [x is None for x in ra] == [x is None for x in rb], (ra, rb)
        assert [x for x in ra if x is not None] == pytest.approx([x for x in rb if x is not None], rel=1e-6,
                                                                 abs=1e-7), (ra, rb)
    ta, _, _ = load_prefix(tmp_path / "a" / "p.safetensors")
    tb, _, _ = load_prefix(tmp_path / "b" / "p.safetensors")
    torch.testing.assert_close(ta, tb, rtol=1e-6, atol=1e-6)
    # the loss scaler's counters are saved, also where the ZeRO-0 16-bit optimizers keep them (loss_scale_config)
    trainer = json.loads((tmp_path / "a" / "p.state" / "trainer.json").read_text())
    if prec != "fp32":
        assert "cur_scale" in trainer["loss_scaler"], trainer["loss_scaler"]
    if prec != "fp32" and stage == 0:
        assert trainer["loss_scaler"]["cur_iter"] == 7, trainer["loss_scaler"]
    # the state holds fp32 masters, not a 16-bit working copy (which bf16/fp16 would represent exactly) ...
    weights = load_file(str(tmp_path / "a" / "p.state" / "encoder.safetensors"))
    if prec != "fp32":
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        assert any(not torch.equal(t, t.to(low).float()) for k, t in weights.items() if k != "anchor")
    # ... and the saved prefix is the table of those masters when the last step was the best
    dev = {r[0]: r[2] for r in a if r[2] is not None}
    if min(dev, key=lambda k: (dev[k], -k)) == 7:
        master = master_table(tmp_path / "a" / "p.state", tmp_path / "a" / "p.safetensors")
        torch.testing.assert_close(ta, master, rtol=1e-6, atol=1e-7)


def supported_precisions() -> list[str]:
    return [p for p in ("fp32", "fp16", "bf16") if unsupported_precision(p) is None]


def test_unsupported_precision_is_refused_up_front(tiny_llama_dir, text_jsonl, tmp_path):
    """fp16 where the device has none: a one-line error naming --bf16 / --precision auto, before any model loads."""
    missing = [p for p in ("fp16", "bf16") if p not in supported_precisions()]
    if not missing:
        pytest.skip("this machine trains in fp16 and bf16 alike: nothing to refuse here")
    flag = f"--{missing[0]}"
    proc = run([sys.executable, "-m", "train", "--model", "/no/such/model", "--data", str(text_jsonl), flag,
                "--save_dir", str(tmp_path / "out")], check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: {missing[0]} is not supported on this") and "--precision auto" in err
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()  # refused before /no/such/model


def test_offload_needs_a_zero_stage(tiny_llama_dir, text_jsonl, tmp_path):
    proc = run([sys.executable, "-m", "train", "--model", str(tiny_llama_dir), "--data", str(text_jsonl),
                "--zero_stage", "0", "--offload", "--precision", "fp32", "--save_dir", str(tmp_path / "out")],
               check=False)
    assert proc.returncode != 0 and "error: --offload needs ZeRO stage 1, 2 or 3" in proc.stderr
    assert not (tmp_path / "out").exists()
