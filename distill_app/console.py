"""Terminal output: human text on stderr, one JSON object as stdout's last line, progress,
and the single place where errors become exit codes (with secrets redacted)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import traceback
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cache import StoreError

from .errors import DistillError

err = Console(stderr=True, highlight=False, soft_wrap=True)

def secret_env_vars() -> list[str]:
    """Environment variables whose values must never be printed: every provider's key, and the
    token of serve-teacher."""
    from .teachers import key_env_vars
    from .teachers.serve import TOKEN_ENV_VAR

    return sorted(key_env_vars() | {TOKEN_ENV_VAR})


def redact(text: str) -> str:
    """``text`` with the value of every secret environment variable replaced by ``***``."""
    for name in secret_env_vars():
        value = os.environ.get(name, "").strip()
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def emit_json(obj: dict) -> None:
    """Print ``obj`` as one line of JSON on stdout (the last line of the command's output)."""
    sys.stdout.write(redact(json.dumps(obj, default=str, sort_keys=False)) + "\n")
    sys.stdout.flush()


def user_errors(fn: Callable) -> Callable:
    """Exit 1 with a one-line message for errors the user can fix; redact everything printed."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DistillError, StoreError) as e:
            err.print(f"[red]Error:[/red] {redact(str(e))}", markup=True, highlight=False)
            raise typer.Exit(1) from None
        except OSError as e:
            if getattr(e, "errno", None) == 28:  # ENOSPC
                err.print("Error: disk full: free some space and run again (stored work is kept)")
            else:
                err.print(f"Error: {redact(str(e))}")
            raise typer.Exit(1) from None
        except (typer.TyperException, typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # a bug: say so, with a traceback that holds no secrets
            if os.environ.get("DISTILL_DEBUG"):
                err.print(redact(traceback.format_exc()), markup=False)
            err.print(f"Error: unexpected {type(e).__name__}: {redact(str(e))} "
                      "(set DISTILL_DEBUG=1 for a traceback and report it)", markup=False)
            raise typer.Exit(1) from None

    return wrapper


@contextlib.contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
    """Yields ``update(done, total)``: a rich bar on a terminal, else a line every 5 seconds."""
    if err.is_terminal:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda done, tot: bar.update(task, completed=done, total=tot)
        return
    last = [0.0]

    def update(done: int, tot: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 5.0 or done == tot:
            last[0] = now
            err.print(f"{description}: {done}/{tot}", markup=False)

    yield update
