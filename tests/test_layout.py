"""The house rules of the layout: the core (prefix/, data/) imports no front-end (train/, serve/, convert/,
inference/), prefix/ does not import data/, and imports between the project's folders read as the folders do."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("prefix", "data")
FRONT_ENDS = ("train", "serve", "convert", "inference")


def modules(folder: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / folder).glob("*.py") if p.stem not in ("__init__", "__main__"))


def project_imports(path: Path) -> set[str]:
    """The project folders a module imports (absolute `prefixtune.X` / `train`, or relative `..X`), read statically,
    at any depth (function-level imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level >= 2 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 0 and node.module:
                parts = node.module.split(".")
                if parts[0] == "prefixtune" and len(parts) > 1:
                    out.add(parts[1])
                elif parts[0] == "train":
                    out.add("train")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "prefixtune" and len(parts) > 1:
                    out.add(parts[1])
    return out


def test_the_core_names_no_front_end():
    bad = []
    for folder in CORE:
        for path in sorted((ROOT / folder).glob("*.py")):
            for target in project_imports(path):
                if target in FRONT_ENDS or (folder == "prefix" and target == "data"):
                    bad.append(f"{folder}/{path.name} imports {target}/")
    assert bad == []


def test_importing_every_core_module_loads_no_front_end():
    """Side effects count too: import every module of prefix/ and data/ in a fresh interpreter, then look at what
    else came in."""
    names = [f"prefixtune.{folder}.{m}" for folder in CORE for m in modules(folder)]
    code = ("import importlib, sys\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in ('prefixtune', 'train'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = proc.stdout.split()
    assert len([m for m in loaded if m.startswith("prefixtune.prefix.")]) == len(modules("prefix"))
    front = [m for m in loaded if m.split(".")[0] == "train"
             or (m.startswith("prefixtune.") and m.split(".")[1] in FRONT_ENDS)]
    assert front == []


def test_imports_between_folders_are_relative():
    """Inside the package, a module reaches another folder as `..prefix.io`, so the imports read as the layout does;
    only the modules run as the top-level `train` (`deepspeed --module train`, `python -m train.demo`) name
    `prefixtune.` themselves: a relative import cannot leave a top-level package."""
    absolute = []
    for folder in (*CORE, *FRONT_ENDS):
        for path in sorted((ROOT / folder).glob("*.py")):
            if (folder, path.name) in (("train", "__main__.py"), ("train", "demo.py")):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(
                        "prefixtune"):
                    absolute.append(f"{folder}/{path.name}:{node.lineno} from {node.module}")
    assert absolute == []
