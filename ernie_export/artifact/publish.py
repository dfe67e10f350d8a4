"""Where an export may write, and how it replaces what is there: nothing lost, at any point.

In:  the output path, the source checkpoint, whether replacing was asked for.
Out: `staged(out, ckpt, overwrite)`, a context manager that holds a per-output lock, checks the
     output is safe to (re)place, recovers what an interrupted earlier run left, and yields a
     fresh staging directory beside the output; `publish(tmp, out)` swaps it into place.

Rules:
- `--overwrite` replaces only a complete artifact of ours: a directory holding our manifest and
  nothing but the files it lists. Anything else (user files, a checkpoint) is refused.
- The output may not be, lie inside, or contain the source checkpoint.
- One export per output at a time: a second one is refused at once (an flock on `.NAME.lock`).
- Replacing is one atomic exchange of the two directories (Linux renameat2 RENAME_EXCHANGE): at
  every instant the output path holds either the old or the new artifact. Where the exchange
  is unavailable, two renames are used, and the next run restores the old artifact if a kill
  fell between them. Stale staging directories of killed runs (~1.4 GB each at full size) are
  removed by the next run for the same output.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from runtime.core.contract import FORMAT, MANIFEST
from runtime.core.errors import UsageError


class OutputError(UsageError, RuntimeError):
    """The output path cannot be written or replaced safely; the message says why."""


class OutputExistsError(OutputError, FileExistsError):
    """The output directory exists and replacing it was not asked for."""


class OutputBusyError(OutputError):
    """Another export to the same output is running."""


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def replaceable_problem(out: Path) -> str | None:
    """Why `out` is not a complete artifact of ours (None if it is one)."""
    if out.is_symlink() or not out.is_dir():
        return "it is not a directory"
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        listed = {entry["path"] for entry in manifest["files"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"it has no readable {MANIFEST} of ours"
    if manifest.get("format") != FORMAT:
        return f"its {MANIFEST} is not an {FORMAT} manifest"
    extra = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")  # folders: onnx/ of the hf layout
                   if not p.is_dir() and p.relative_to(out).as_posix() not in listed | {MANIFEST})
    if extra:
        return f"it holds files the artifact does not list ({', '.join(extra[:5])})"
    return None


def check_output(out: Path, ckpt: Path | None, overwrite: bool) -> None:
    out_r = out.resolve()
    if ckpt is not None:
        ck = ckpt.resolve()
        if _is_within(out_r, ck):
            raise OutputError(f"the output {out} is {'' if out_r == ck else 'inside '}the source checkpoint {ckpt}; "
                              "choose an output directory outside it")
        if _is_within(ck, out_r):
            raise OutputError(f"the source checkpoint {ckpt} is inside the output {out}; choose another output directory")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
        problem = replaceable_problem(out)
        if problem:
            raise OutputError(f"refusing to replace {out}: {problem}; only a complete artifact written by this "
                              "tool is replaced. Remove it yourself or choose another output directory")


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Exclusive, non-blocking lock for one output path, held by an open file; released on exit or death."""
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(f"another export to {out} is running (it holds {lock}); wait for it to finish "
                                  "or choose another output directory") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break  # the file we locked is still the lock file (not one unlinked by a finishing run)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(lock)
        os.close(fd)


def recover(out: Path, log=lambda m: None) -> None:
    """Under the lock: restore an old artifact stranded by a kill between two renames, and remove
    staging directories of killed runs (any for this output are stale while we hold its lock)."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists():
        olds.pop().rename(out)
        log(f"[export] restored {out}: an earlier replacement was interrupted before the new artifact was in place")
    for stale in olds + list(out.parent.glob(f".{out.name}.partial-*")):
        shutil.rmtree(stale, ignore_errors=True)
        log(f"[export] removed {stale.name}, left by an interrupted run")


@contextmanager
def staged(out: Path, ckpt: Path | None, overwrite: bool, log=lambda m: None) -> Iterator[Path]:
    """Lock `out`, check it, recover, and yield a fresh staging sibling (removed again on failure)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        recover(out, log)
        check_output(out, ckpt, overwrite)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after publish() it holds the replaced artifact, or nothing


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding like Ctrl-C. A subclass, not KeyboardInterrupt itself: measured, a bare
    KeyboardInterrupt raised mid-trace sometimes made CPython end the process with a SIGINT status
    after main() had returned (its "unhandled KeyboardInterrupt" flag stays set); a subclass does not."""


def interrupt_on_sigterm() -> None:
    """SIGTERM (a service manager, `kill`) unwinds like Ctrl-C: staging is removed, nothing published."""
    def handler(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, handler)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(tmp: Path, out: Path) -> None:
    """Put the staged directory at `out`. An existing artifact is swapped out in one step and its
    files end up in `tmp`, which `staged()` removes."""
    if not out.exists():
        tmp.rename(out)
        return
    if _exchange(tmp, out):
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    tmp.rename(out)  # a kill before this line leaves `old`, which the next run's recover() restores
    old.rename(tmp)
