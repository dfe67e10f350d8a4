"""Errors with structure: what went wrong, the option or request field it concerns, and how each front end reports it.

In:  raised by any stage, export side and runtime alike (this module is torch-free, so both import it).
Out: `ErnieError` and its kinds; front ends never parse or rewrite a message, they read fields:
     - `problem`: the sentence saying what is wrong and what to do, without the option's name;
     - `option`: the API name of the option or request field it concerns (`max_new_tokens`, `top_p`), or None;
     - `kind`: one of KINDS, which fixes the exit code of every command line and the HTTP status of the server.

A command line prints `error: <--flag> <problem>` (the option worded as its flag, `flag()`), the server answers
`{"error": {"message", "type", "param"}}` with `param` the request field (`serve.app` maps option names onto
OpenAI's field names, one table). Exit codes are the same in every CLI (README, "Exit codes"); every command line's
`main` runs its body through `run_cli`, the one place that turns an exception into an `error:` line and a status.
"""

from __future__ import annotations

import errno
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Kind:
    name: str
    exit_code: int  # every command line's exit status for this kind
    http_status: int  # the server's status
    openai_type: str  # the OpenAI error object's `type`


USAGE = Kind("usage", 2, 400, "invalid_request_error")  # a flag, option, prompt or request the caller can fix
SOURCE = Kind("source", 3, 500, "server_error")  # the artifact or checkpoint pointed at is unusable as it is
FAILURE = Kind("failure", 1, 500, "server_error")  # a run that started failed (a step, a verification, the disk)
BUSY = Kind("busy", 1, 429, "server_busy")  # the server's queue is full: retry later
TIMEOUT = Kind("timeout", 1, 504, "server_error")  # a request ran out of its time budget
KINDS = (USAGE, SOURCE, FAILURE, BUSY, TIMEOUT)
INTERRUPTED, TERMINATED = 130, 143  # exit codes on Ctrl-C and SIGTERM (128 + the signal), every command line


class ErnieError(Exception):
    """Base of every error this toolchain reports to a user. Subclasses fix the kind; instances carry the problem and,
    where one is concerned, the option (its API name)."""
    kind: Kind = FAILURE

    def __init__(self, problem: str, option: str | None = None):
        self.problem, self.option = problem, option
        super().__init__(f"{option} {problem}" if option else problem)

    def flag(self) -> str:
        """The option as a command line's flag (`max_new_tokens` -> `--max-new-tokens`), or ''."""
        return "--" + self.option.replace("_", "-") if self.option else ""

    def cli_line(self) -> str:
        """The one line a command line prints on stderr."""
        return f"error: {self.flag()} {self.problem}" if self.option else f"error: {self.problem}"


class UsageError(ErnieError):
    """Something the caller asked for that cannot be done as asked: a flag, option, prompt or request."""
    kind = USAGE


class OptionError(UsageError):
    """An option with a value it cannot take; `option` names it in the API's own name."""

    def __init__(self, option: str, problem: str):
        super().__init__(problem, option)


class SourceProblem(ErnieError):
    """The artifact or checkpoint pointed at cannot be used as it is (missing, damaged, unsupported)."""
    kind = SOURCE


class Failure(ErnieError):
    """A run that started and failed: a model step, a verification, writing the output."""
    kind = FAILURE


def exit_code(e: BaseException) -> int:
    """The exit status of every command line for `e` (KeyboardInterrupt: 130; our errors: their kind's)."""
    if isinstance(e, KeyboardInterrupt):
        return TERMINATED if type(e).__name__ == "Terminated" else INTERRUPTED
    return e.kind.exit_code if isinstance(e, ErnieError) else FAILURE.exit_code


def os_problem(e: OSError) -> str:
    """An OSError none of our classes wraps (a full disk, a permission), worded as what to do."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return f"disk full{where}; free space or write somewhere else"
    return f"{e.strerror or e}{where}; check the paths and permissions"


def error_line(e: BaseException, interrupted: str = "") -> str:
    """The one line a command line prints on stderr for `e`: ours from their fields, an OSError in words, an
    interrupt as `interrupted` / `terminated` followed by `interrupted` (what it left behind, e.g. '; nothing was
    written')."""
    if isinstance(e, ErnieError):
        return e.cli_line()
    if isinstance(e, KeyboardInterrupt):
        return f"\nerror: {'terminated' if exit_code(e) == TERMINATED else 'interrupted'}{interrupted}"
    return f"error: {os_problem(e)}" if isinstance(e, OSError) else f"error: {e}"


def run_cli(body: Callable[[], object], interrupted: str = "") -> int:
    """Run a command line's body; returns its exit status: the body's own when it returns an int (else 0), or, when it
    raises one of our errors, an OSError or an interrupt, that error's (`exit_code`) after printing its one `error:`
    line on stderr. Anything else is a bug and keeps its traceback."""
    try:
        status = body()
        return status if isinstance(status, int) else 0
    except (ErnieError, OSError, KeyboardInterrupt) as e:
        print(error_line(e, interrupted), file=sys.stderr, flush=True)
        return exit_code(e)
