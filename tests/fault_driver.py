"""Run `python -m train` with a fault injected from outside the product code, for the fault and resume tests.

    PREFIXTUNE_FAULT='{"kill_after_step": 5}'             SIGKILL right after step 5's metrics line
    PREFIXTUNE_FAULT='{"kill_at_write": 3}'               SIGKILL at the 3rd file write or rename of a save
    PREFIXTUNE_FAULT='{"enospc_at_write": 2}'             the 2nd file write of a save fails with ENOSPC
    PREFIXTUNE_FAULT='{"snapshot_after_step": 4, "to": D}' copy --save_dir to D once step 4's state is saved

Writes and renames are counted from the first save after step 0 (prefix file, state files, state renames).
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import sys

import prefixtune.prefix.io as prefix_io
import prefixtune.train.outputs as outputs
import prefixtune.train.state as state
from prefixtune.train.loop import main

FAULT = json.loads(os.environ.get("PREFIXTUNE_FAULT", "{}"))
seen = {"step": 0, "writes": 0}


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _counted(fn):
    def wrapper(*args, **kwargs):
        if seen["step"] >= 1:
            seen["writes"] += 1
            if FAULT.get("kill_at_write") == seen["writes"]:
                _kill()
            if FAULT.get("enospc_at_write") == seen["writes"]:
                raise OSError(errno.ENOSPC, "No space left on device")
        return fn(*args, **kwargs)
    return wrapper


state.save_file = _counted(state.save_file)
prefix_io.save_file = _counted(prefix_io.save_file)
_rename = pathlib.Path.rename
pathlib.Path.rename = _counted(_rename)

_metrics = outputs.Log.metrics


def metrics(self, row):
    _metrics(self, row)
    seen["step"] = row["step"]
    if FAULT.get("kill_after_step") == row["step"]:
        _kill()


outputs.Log.metrics = metrics

_write_state = state.write_state


def write_state(folder, params, anchor, moments, rng, trainer):
    _write_state(folder, params, anchor, moments, rng, trainer)
    if FAULT.get("snapshot_after_step") == trainer["step"]:
        shutil.copytree(folder.parent, FAULT["to"])


state.write_state = write_state
import prefixtune.train.loop as loop  # noqa: E402  (the loop imported write_state by name)

loop.write_state = write_state

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
