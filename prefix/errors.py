"""The project's error convention: library code raises, command-line entry points print one line and exit.

Library functions (prefix/, data/, train/, convert/) raise exceptions and never exit the process: a `ValueError` or
`OSError` that a caller may reword or recover from, or a `UserError` whose message is final, written for the person
at the command line ("--flag X: expected Y, got Z; do W"). Only a command-line entry point (a `main()` wrapped with
`exits_on_error`) turns an error into the one line `error: <message>` on stderr and exit status 1. argparse's usage
errors keep argparse's own status 2. Any other exception is a bug and keeps its traceback.

Standard library only: entry points import it before torch loads.
"""
from __future__ import annotations

import functools
import sys

EXIT_REFUSED = 1  # every refused input or failure; argparse exits 2 for a usage error by itself


class UserError(ValueError):
    """A refused input, or a failure the user can act on (a full disk, a locked run): its message is the whole
    story, without the leading "error: " (the entry point adds it). A ValueError, so library callers that catch
    refusals as ValueError keep working."""


def one_line(e: BaseException | str, limit: int | None = 1000) -> str:
    """An exception's message on one line (Hugging Face's span several), shortened to `limit` characters (None:
    never shortened); the exception's type name when it has no message."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def error_line(e: BaseException | str) -> str:
    """What an entry point prints for a refusal: `error: <message>` on one line."""
    return f"error: {one_line(e, limit=None)}"


def exits_on_error(*errors: type[BaseException]):
    """Decorator for a command-line `main()`: an exception of `errors` (UserError when none are named) is printed as
    one line `error: <message>` on stderr and main returns 1 (`sys.exit(main())` then exits 1). Every process of a
    multi-process run that refuses does the same, so the launcher sees status 1 from it."""
    caught = errors or (UserError,)

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except caught as e:
                print(error_line(e), file=sys.stderr, flush=True)
                return EXIT_REFUSED
        return run

    return wrap
