"""The served models: the base and its tasks, as the HTTP layer names them (vLLM's serving_models).

A request's `model` is the base id (or "base": no prefix), a loaded task, or a `--prefix_dir` file's name, which is
loaded on first use. Tasks load and unload at run time (`load_lora_adapter` / `unload_lora_adapter`); every file is
checked against the served base from its header before its table is read; paths are resolved once, must lie inside
--prefix_dir or a --load_from folder, and the path checked is the path opened; at most --max_loras tasks are held.
Task names follow the one rule of prefix/tasks.py, and the base model's id is reserved beside "base".
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from ..prefix.errors import one_line
from ..prefix.io import check_base_model, check_compatible, load_prefix
from ..prefix.tasks import BASE_TASK, check_file_task, task_name_problem
from .contract import EngineClient, UnknownTask
from .protocol import ApiError
from .threads import in_passing_thread

log = logging.getLogger("prefixtune.serve")


class ServingModels:
    """The base and the tasks of one engine: names, files, loading and unloading."""

    def __init__(self, engine: EngineClient, base_id: str, options, max_context: Callable[[], int]):
        self.engine, self.base_id, self.options, self.max_context = engine, base_id, options, max_context
        self.sources: dict[str, str] = options.sources  # task -> the file it came from (for /v1/models)
        self.created = int(time.time())
        self._locks: dict[str, list] = {}  # task name -> [its lock, users]; a name leaves when its last user does
        self._loading: set[str] = set()    # names being loaded (they count against --max_loras)

    def reserved(self, name: str) -> bool:
        return name in (BASE_TASK, self.base_id)

    @asynccontextmanager
    async def _locked(self, name: str):
        """Hold task `name`'s lock. The map keeps a name only while a request holds or awaits its lock, so names
        that clients merely tried leave nothing behind."""
        entry = self._locks.setdefault(name, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[name]

    def _read_checked(self, name: str, path: str):
        """Read a prefix file and check it against the served base (a worker thread: it reads the file). Everything
        is checked on the header before the table is read."""
        other = []

        def check(shape, meta):
            check_file_task(path, name)
            if self.options.config is not None:
                check_compatible(path, shape, meta, self.options.config)
            if shape.prefix_len >= self.max_context():
                raise ValueError(f"{path}: prefix length {shape.prefix_len} leaves no room in this model's "
                                 f"{self.max_context()} positions")
            if not check_base_model(path, meta, self.options.model_ref, self.options.allow_other_base):
                other.append(meta.get("base_model") or "smollm2")

        table, shape, _ = load_prefix(path, check)
        if other:
            log.warning("%s was trained on %s; serving it on %s (--allow_other_base)", path, other[0], self.base_id)
        return table, shape

    def check_name(self, name: str, param: str = "lora_name") -> None:
        """A task name by the one rule (prefix/tasks.py), and not the base model's id: else a 400."""
        problem = task_name_problem(name)
        if problem is None and self.reserved(name):
            problem = f"task name {name!r} is reserved: it means the base model without a prefix"
        if problem is not None:
            raise ApiError(400, problem, param=param)

    async def load_task(self, name: str, path, replace: bool = False) -> None:
        """Load the prefix file `path` (already resolved and checked, as allowed_path returns it) as task `name`."""
        self.check_name(name)
        async with self._locked(name):
            tasks = self.engine.tasks()
            if name in tasks and not replace:
                raise ApiError(400, f"task {name!r} is already loaded (from {self.sources.get(name, '?')}); "
                               "unload it first or pass load_inplace=true", param="lora_name")
            held = set(tasks) | self._loading
            if name not in held and len(held) >= self.options.max_loras:
                raise ApiError(400, f"cannot load task {name!r}: {len(held)} tasks are loaded, the most this server "
                               f"holds (--max_loras {self.options.max_loras}); unload one with POST "
                               "/v1/unload_lora_adapter or start the server with a larger --max_loras",
                               param="lora_name", code="max_loras_reached")
            self._loading.add(name)
            try:
                table, shape = await asyncio.to_thread(in_passing_thread, self._read_checked, name, str(path))
                await asyncio.to_thread(in_passing_thread, self.engine.add_task, name, table, shape, replace)
            except (ValueError, FileNotFoundError, OSError) as e:
                raise ApiError(400, f"cannot load task {name!r}: {one_line(e)}", param="lora_path") from None
            finally:
                self._loading.discard(name)
            self.sources[name] = str(path)
        log.info("task %s loaded from %s", name, path)

    def allowed_path(self, path, param: str = "lora_path", what: str | None = None) -> Path:
        """`path` with its links and '..' resolved, once: it must lie inside --prefix_dir or a --load_from folder,
        else a 403, so an API key holder cannot make the server read arbitrary files (load_lora_adapter), nor can a
        link in --prefix_dir lead outside. Open the path returned: it is the one that was checked."""
        roots = [r for r in (self.options.prefix_dir, *self.options.load_from) if r]
        if not roots:
            raise ApiError(403, "loading prefixes by path is off on this server: start it with --load_from DIR "
                           "(or --prefix_dir DIR) to allow files in DIR", param=param, type="permission_error")
        target = Path(path).expanduser().resolve()
        if not any(target.is_relative_to(Path(r).expanduser().resolve()) for r in roots):
            raise ApiError(403, f"{what or f'{param} {path}'} is outside the folders this server loads from "
                           f"({', '.join(roots)}); move the file there or add its folder with --load_from",
                           param=param, type="permission_error")
        return target

    def check_load_path(self, path: str) -> Path:
        return self.allowed_path(path, "lora_path")

    def dir_file(self, name: str) -> Path | None:
        """--prefix_dir's file for task `name`, if there is one (not resolved: allowed_path does that)."""
        d = self.options.prefix_dir
        if not d or task_name_problem(name) or self.reserved(name):
            return None
        path = Path(d) / f"{name}.safetensors"
        return path if path.is_file() else None

    async def resolve(self, name: str) -> str | None:
        """A request's `model` -> the engine's task (None = the base model); 404 if there is no such model."""
        if self.reserved(name):
            return None
        if name in self.engine.tasks():
            return name
        path = self.dir_file(name)
        if path is not None:
            real = self.allowed_path(path, "model", what=f"{path} (model {name!r}) links to a file that")
            async with self._locked(name):
                loaded = name in self.engine.tasks()
            if not loaded:
                try:
                    await self.load_task(name, real)
                except ApiError as e:
                    if name not in self.engine.tasks():  # another request may have loaded it meanwhile
                        raise ApiError(400, e.message, param="model", code=e.code) from None
            return name
        raise ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def model_cards(self) -> list[dict]:
        def card(mid, root, parent):
            return {"id": mid, "object": "model", "created": self.created, "owned_by": "prefixtune", "root": root,
                    "parent": parent, "max_model_len": self.max_context()}

        cards = [card(self.base_id, self.options.model_ref or self.base_id, None)]
        tasks = self.engine.tasks()
        cards += [card(name, self.sources.get(name), self.base_id) for name in tasks]
        if self.options.prefix_dir and Path(self.options.prefix_dir).is_dir():
            for path in sorted(Path(self.options.prefix_dir).glob("*.safetensors")):
                if path.stem not in tasks and self.dir_file(path.stem) is not None:
                    try:
                        self.allowed_path(path)
                    except ApiError:  # a link that leads outside: not served, so not listed
                        continue
                    cards.append(card(path.stem, str(path), self.base_id))
        return cards

    def check_model(self, name: str | None) -> None:
        """/tokenize, /detokenize: `model`, when given, names the base, a loaded task or a --prefix_dir file (404
        otherwise); nothing is loaded, the tokenizer is the base's whatever the task."""
        if name is None or self.reserved(name) or name in self.engine.tasks() or self.dir_file(name) is not None:
            return
        raise ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    async def unload_task(self, name: str) -> bool:
        """Refuse new requests for `name` and wait for its requests in flight, up to --drain_timeout: True when it is
        gone, False when it goes once its last request ends."""
        if self.reserved(name):
            raise ApiError(400, f"{name!r} is the base model, not a task", param="lora_name")
        self.check_name(name)
        try:
            # bounded: a request that never ends must not hold this worker thread (and the client) forever
            gone = await asyncio.to_thread(self.engine.remove_task, name, self.options.drain_timeout)
        except UnknownTask:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                           code="model_not_found") from None
        self.sources.pop(name, None)
        return gone
