"""What a training run writes in --save_dir, and the guards around it.

    <save_name>.safetensors     the best prefix so far (replaced atomically)
    <save_name>.state/          the training state for --resume (a new folder swapped in whole, see state.py)
    <save_name>.metrics.jsonl   one JSON line per optimizer step, appended (a kill loses at most the line being
                                written; --resume drops the lines after its state)
    <save_name>.lock            held while a run writes these: a second run on the same --save_name is refused

Only rank 0 writes.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..prefix.errors import UserError
from ..prefix.io import atomic_path


@dataclass(frozen=True)
class Outputs:
    folder: Path
    name: str

    @property
    def prefix(self) -> Path:
        return self.folder / f"{self.name}.safetensors"

    @property
    def state(self) -> Path:
        return self.folder / f"{self.name}.state"

    @property
    def metrics(self) -> Path:
        return self.folder / f"{self.name}.metrics.jsonl"

    @property
    def lock(self) -> Path:
        return self.folder / f"{self.name}.lock"

    def remove_leftovers(self) -> None:
        """Temporaries of a run that was killed mid-save (only the lock holder may call this): the state folder's,
        atomic_path's, and `.tmpXXXXXX`, the name safetensors' own save_file wrote the prefix under before
        prefix.io wrote it itself (removed only when its header is a prefix of this --save_name)."""
        for p in self.folder.glob(f"{self.name}.state.tmp*"):
            shutil.rmtree(p, ignore_errors=True)
        for pattern in (f".{self.name}.safetensors.*.tmp", f".{self.name}.metrics.jsonl.*.tmp"):
            for p in self.folder.glob(pattern):
                p.unlink(missing_ok=True)
        for p in self.folder.glob(".tmp??????"):
            if p.is_file() and _prefix_save_name(p) == self.name:
                p.unlink(missing_ok=True)


def _prefix_save_name(path: Path) -> str | None:
    """The --save_name a (possibly cut-off) prefixtune prefix file was saved by, read from its header; None if it
    is no such file."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 1 << 20:
                return None
            header = json.loads(f.read(n))
        meta = header.get("__metadata__") or {}
        if meta.get("format") != "prefixtune":
            return None
        name = json.loads(meta.get("train_args") or "{}").get("save_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


class RunLock:
    """An exclusive `flock` on <save_name>.lock for the whole run; the kernel drops it if the process dies."""

    def __init__(self, out: Outputs):
        self.path = out.lock
        self.fd = None
        self.made_folder = False
        self.made: list[Path] = []  # the folders acquire() created, innermost first

    def acquire(self) -> None:
        """Hold the lock, or raise a UserError: another run holds it, or the folder or the lock file cannot be
        written (a full disk, no permission). A failed start leaves nothing behind: no lock file, no folder."""
        folder = self.path.parent
        self.made = []
        probe = folder
        while not probe.exists() and probe.parent != probe:
            self.made.append(probe)
            probe = probe.parent
        self.made_folder = bool(self.made)
        fd, ours = None, False
        try:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                fd, ours = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                fd = None
                raise UserError(f"another run (pid {other}) is writing {self.path.with_suffix('')}.* in "
                                f"{folder}: wait for it to finish, or choose another --save_name") from None
            ours = True  # held: a lock file left by a dead run is ours to remove too
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as e:
            if fd is not None:
                if ours:
                    self.path.unlink(missing_ok=True)
                os.close(fd)
            self._remove_made_folders()
            if is_disk_full(e):
                raise UserError(f"no space left in {folder} to start the run (its lock file "
                                f"{self.path.name} cannot be written); free some space, then run again") from None
            raise UserError(f"cannot write the lock file {self.path} ({e.strerror or e}); pass a --save_dir "
                            "you can write to") from None
        self.fd = fd

    def _remove_made_folders(self) -> None:
        for made in self.made:  # innermost first; a folder something else was written into stays
            try:
                made.rmdir()
            except OSError:
                break

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held, so no other run can hold it meanwhile
            os.close(self.fd)
            self.fd = None
            self._remove_made_folders()  # a run that failed before writing anything leaves no trace


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC or EDQUOT, raised as OSError by Python or as a SafetensorError carrying the OS message by safetensors."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return any(m in text for m in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "os error 28",
                                   "os error 122"))


def no_space_message(e: BaseException, what: str, folder: Path, need_bytes: int) -> str | None:
    """One line for a full disk (or quota), naming the folder and the space needed; None for other errors."""
    from .estimate import fmt

    if not is_disk_full(e):
        return None
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    return (f"no space left in {folder} to save the {what} (needs about {fmt(need_bytes)}, "
            f"{fmt(free)} free); free some space, then continue with --resume (the previous outputs "
            "are intact)")


class Log:
    """Rank-0 output: console lines (around the progress bar) and the metrics JSONL."""

    def __init__(self, rank: int, metrics_path: Path):
        self.on = rank == 0
        self.metrics_path = metrics_path
        self.bar = None

    def __call__(self, msg: str) -> None:
        if not self.on:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def metrics(self, row: dict) -> None:
        if not self.on:
            return
        line = json.dumps(row) + "\n"
        try:
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:
            msg = no_space_message(e, "metrics", self.metrics_path.parent, len(line))
            if msg is None:
                raise
            raise UserError(msg) from None

    def truncate_metrics(self, last_step: int) -> None:
        """On resume: forget the steps after the saved state (they run again) and a line cut by a kill."""
        if not self.on or not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row["step"] <= last_step:
                keep.append(line)
        text = "".join(r + "\n" for r in keep)
        try:
            with atomic_path(self.metrics_path) as tmp:
                tmp.write_text(text, encoding="utf-8")
        except OSError as e:
            msg = no_space_message(e, "metrics", self.metrics_path.parent, len(text))
            if msg is None:
                raise
            raise UserError(msg) from None
