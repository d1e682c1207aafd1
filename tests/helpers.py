"""Run the project's commands in subprocesses (DeepSpeed's process group is per process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefixtune.train.ports import free_port  # noqa: F401 (the tests' one free-port helper)

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], env: dict | None = None, input: str | None = None, timeout: int = 600,
        check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("RANK", None)
    proc = subprocess.run(args, cwd=ROOT, env=full_env, input=input, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train(*flags, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "train", *map(str, flags)], **kw)


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def train_with_fault(*flags, fault: dict | None = None, processes: int = 1, port: int = 29650, **kw):
    """`python -m train` (or the deepspeed launcher with `processes` CPU ranks) through tests/fault_driver.py."""
    import shutil

    driver = str(ROOT / "tests" / "fault_driver.py")
    env = {**(kw.pop("env", None) or {}), "PREFIXTUNE_FAULT": json.dumps(fault or {})}
    if processes == 1:
        cmd = [sys.executable, driver]
    else:
        cmd = [shutil.which("deepspeed"), "--num_gpus", str(processes), "--master_port", str(port), driver]
    return run([*cmd, *map(str, flags)], env=env, **kw)


def curve(path: Path) -> list[tuple]:
    """(step, loss, dev_loss, lr) of every metrics line: what a resumed run must reproduce."""
    return [(r["step"], r.get("loss"), r.get("dev_loss"), r.get("lr")) for r in metrics(path)]
