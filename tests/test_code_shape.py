"""The shape of the code: conventions that hold across the project's folders, checked on the source itself."""
from __future__ import annotations

import ast
import sys

import pytest
from helpers import ROOT, run

# ------------------------------------------------------------------------------------------ errors and exit codes
# Library code raises (ValueError, OSError, prefix.errors.UserError); only command-line entry points turn an error
# into one line `error: <message>` on stderr and exit status 1 (argparse's usage errors: its own 2).

LIBRARY_FOLDERS = ("prefix", "data", "train", "convert", "inference")


def _is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` at module level."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def _exits(tree: ast.AST):
    """(line, text) of every `raise SystemExit`, `sys.exit(...)`, `exit(...)`, `quit(...)` and `os._exit(...)`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                yield node.lineno, "raise SystemExit"
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and \
                    (f.value.id, f.attr) in (("sys", "exit"), ("os", "_exit")):
                yield node.lineno, f"{f.value.id}.{f.attr}()"
            elif isinstance(f, ast.Name) and f.id in ("exit", "quit"):
                yield node.lineno, f"{f.id}()"


def library_exits() -> list[str]:
    """Process exits outside command-line entry code: a `__main__.py` module's own top level and a module's
    `if __name__ == "__main__":` block are entry code; every function (main() included) raises instead."""
    found = []
    for folder in LIBRARY_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            entry = {id(n) for top in tree.body if _is_main_guard(top) for n in ast.walk(top)}
            if path.name == "__main__.py":  # its module-level statements are the entry point; its functions are not
                entry |= {id(n) for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.ClassDef))
                          for n in ast.walk(top)}
            entry_lines = {getattr(n, "lineno", None) for top in tree.body for n in ast.walk(top) if id(n) in entry}
            found += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in _exits(tree)
                      if line not in entry_lines]
    return found


def test_library_code_raises_instead_of_exiting():
    assert library_exits() == [], ("library code must raise (a UserError for a refusal worded for the user); only "
                                   "`sys.exit(main())` under `if __name__ == '__main__':` may end the process")


def test_exits_on_error_prints_one_line_and_returns_1(capsys):
    from prefixtune.prefix.errors import UserError, exits_on_error

    @exits_on_error()
    def refuses():
        raise UserError("--flag x: expected y,\n  got z; pass w")

    assert refuses() == 1
    assert capsys.readouterr().err == "error: --flag x: expected y, got z; pass w\n"

    @exits_on_error()
    def has_a_bug():
        raise KeyError("not a refusal")

    with pytest.raises(KeyError):  # anything else is a bug: it keeps its traceback
        has_a_bug()
    assert exits_on_error(OSError)(lambda: 0)() == 0


def refused_one_line(proc) -> str:
    """Exit status 1, no traceback, exactly one `error:` line, and it is the last line on stderr."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    return errors[0]


ENTRY_POINTS = {  # one refused input per command line: (argv after python, what the line must say)
    "train": (["-m", "train", "--save_dir", "{tmp}", "--save_name", "p", "--resume"], "no training state at"),
    "convert": (["-m", "prefixtune.convert", "tasks", "{tmp}/no_such_export"], "no_such_export"),
    "demo": (["-m", "train.demo", "--prefix", "{tmp}/no_such.safetensors"], "no_such.safetensors"),
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_refuses_with_one_line_and_exit_1(name, tmp_path):
    argv, needle = ENTRY_POINTS[name]
    proc = run([sys.executable, *(a.format(tmp=tmp_path) for a in argv)], check=False, timeout=300)
    assert needle in refused_one_line(proc)
    assert [p.name for p in tmp_path.iterdir()] == []  # a refusal writes nothing


def test_usage_errors_keep_argparse_exit_2():
    proc = run([sys.executable, "-m", "prefixtune.convert", "tasks"], check=False, timeout=120)
    assert proc.returncode == 2 and "usage:" in proc.stderr
