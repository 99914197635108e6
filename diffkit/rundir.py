"""The run directory's rules: what ``diffkit train --out DIR`` may write over, what
``--force`` does with an old run, and the lock that keeps two trainers out of one run.

- Without ``--force`` or ``--resume``, ``DIR`` must be new or empty: nothing in it is
  ever overwritten.
- ``--force`` moves everything in ``DIR`` aside in one rename, to the sibling
  ``DIR.old-<YYYYmmdd-HHMMSS>``, and starts over in an empty ``DIR``; it deletes nothing.
- ``--resume`` needs a run that diffkit wrote (its ``meta.json`` or a checkpoint).
- While a run trains, ``DIR/.diffkit.lock`` holds an exclusive lock (``flock``) and the
  trainer's pid and host. The lock dies with its process, so a lock file left by a killed
  trainer is taken over, and said so.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffkit.checkpoint import CHECKPOINT_FORMAT, remove_stale_tmp

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock file still names the trainer, but nothing is refused
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "check_train_out", "check_unlocked", "is_run", "lock", "RunLock"]

LOCK_FILE = ".diffkit.lock"
META_FILE = "meta.json"
SPEC_FILE = "spec.yaml"
CHECKPOINTS_DIR = "checkpoints"
_CHECKPOINT_JSON = re.compile(r"^step-\d{8,}\.json$")

Say = Callable[[str], None]


def _entries(out: Path) -> list[str]:
    """What ``out`` holds, less the lock."""
    if not out.is_dir():
        return []
    return sorted(e.name for e in out.iterdir() if e.name != LOCK_FILE)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_run(out: str | Path) -> bool:
    """Whether ``out`` holds a run that diffkit wrote: a diffkit ``meta.json``, or a
    training checkpoint's JSON."""
    out = Path(out)
    meta = _read_json(out / META_FILE)
    if isinstance(meta, dict) and "diffkit_version" in meta and "sample_shape" in meta:
        return True
    checkpoints = out / CHECKPOINTS_DIR
    if checkpoints.is_dir():
        for entry in checkpoints.iterdir():
            if _CHECKPOINT_JSON.match(entry.name):
                state = _read_json(entry)
                if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
                    return True
    return False


def aside_name(out: Path) -> Path:
    """The sibling ``--force`` moves an old run to: ``DIR.old-<time>`` (``-2``, ``-3``, …
    where that is taken)."""
    out = out.resolve()
    stem = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    dest, k = stem, 1
    while dest.exists():
        k += 1
        dest = stem.with_name(f"{stem.name}-{k}")
    return dest


def check_train_out(out: str | Path, *, force: bool = False, resume: bool = False) -> None:
    """Refuse an ``--out`` that training would damage, before anything is built or written.

    Without ``force`` or ``resume`` the directory must be new or empty; ``resume`` needs
    a run diffkit wrote. The messages say how to go on."""
    from diffkit.errors import DiffkitError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiffkitError(f"--out {out} exists and is not a directory; choose a directory")
    check_unlocked(out)
    if resume and force:
        raise DiffkitError("--resume continues the run in --out and --force starts it over; pass one of them")
    entries = _entries(out)
    finished = (out / SPEC_FILE).exists()
    has_checkpoints = (out / CHECKPOINTS_DIR).is_dir() and any((out / CHECKPOINTS_DIR).iterdir())
    if resume:
        if not entries:
            raise DiffkitError(f"--resume: {out} holds no run to continue; train without --resume to start one there")
        if not is_run(out):
            raise DiffkitError(
                f"--resume: {out} is not a diffkit run (no diffkit meta.json and no training checkpoint); nothing was"
                " changed. Give the directory that `diffkit train --out` wrote"
            )
        if finished and not has_checkpoints:
            raise DiffkitError(
                f"{out} holds a finished run without checkpoints to resume from; pass --force to train it anew"
                f" (the old run is moved aside to {out.name}.old-<time>)"
            )
        return
    if force and entries:
        here, target = Path.cwd().resolve(), out.resolve()
        if here == target or target in here.parents:
            raise DiffkitError(
                f"--force moves {out} aside, but it holds the current directory; run from outside it or choose"
                " another --out"
            )
    if force or not entries:
        return
    aside = f"--force to move it aside (to the sibling {out.name}.old-<time>) and start over"
    if finished and is_run(out):
        raise DiffkitError(
            f"{out} already holds a finished run; choose another --out, pass {aside}, or --resume with more --steps"
            " to train it further"
        )
    if has_checkpoints and is_run(out):
        raise DiffkitError(f"{out} holds the checkpoints of an unfinished run; pass --resume to continue it or {aside}")
    shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
    raise DiffkitError(
        f"--out {out} is not empty ({shown}) and is not a diffkit run; choose a new or empty directory, or pass {aside}"
    )


# -- the lock ------------------------------------------------------------------------------
def _holder(info: Any) -> str:
    if not isinstance(info, dict):
        return "another process"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {info.get('since', '?')})"


def _busy_message(out: Path, info: Any) -> str:
    return (
        f"{out} is being trained by {_holder(info)}: its lock {out / LOCK_FILE} is held. Wait for that run to"
        " finish, stop it, or choose another --out"
    )


def check_unlocked(out: str | Path) -> None:
    """Refuse a run directory that a running trainer holds, without taking its lock."""
    from diffkit.errors import DiffkitError

    path = Path(out) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DiffkitError(_busy_message(Path(out), _read_json(path))) from None
    finally:
        os.close(fd)


class RunLock:
    """An exclusive ``flock`` on ``out/.diffkit.lock``, whose content names the holder."""

    def __init__(self, out: str | Path, say: Say | None = None) -> None:
        self.out = Path(out)
        self.say = say or (lambda msg: None)
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.out / LOCK_FILE

    def acquire(self) -> None:
        from diffkit.errors import DiffkitError

        self.out.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_json(self.path)
                os.close(fd)
                raise DiffkitError(_busy_message(self.out, info)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        previous = _read_json(self.path)
        if isinstance(previous, dict) and previous.get("pid") != os.getpid():
            # flock is released when its process ends, so the file's writer is gone (killed, or crashed)
            self.say(f"took over the stale lock {self.path} left by {_holder(previous)}, which no longer runs")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode())
        self._fd = fd
        if is_run(self.out):  # only a run's: a file of the user's named alike is theirs
            remove_stale_tmp(self.out)
            remove_stale_tmp(self.out / CHECKPOINTS_DIR)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def move_aside(self) -> Path | None:
        """Rename everything in the locked ``out`` to a sibling ``out.old-<time>`` at once,
        leaving ``out`` empty and locked; ``None`` where there was nothing to move."""
        from diffkit.errors import DiffkitError

        if not _entries(self.out):
            return None
        dest = aside_name(self.out)
        try:
            os.rename(self.out, dest)
        except OSError as exc:
            raise DiffkitError(
                f"--force could not move {self.out} aside to {dest} ({exc.strerror}); nothing was changed. Empty"
                " it yourself or choose another --out"
            ) from None
        old_fd, self._fd = self._fd, None
        try:
            self.acquire()
        finally:
            if old_fd is not None:
                (dest / LOCK_FILE).unlink(missing_ok=True)
                os.close(old_fd)
        return dest


_held: dict[str, list[Any]] = {}


@contextmanager
def lock(out: str | Path, say: Say | None = None) -> Iterator[RunLock]:
    """Hold the run directory ``out``'s lock for the block; a process that holds it
    already (``diffkit train`` around ``Pipeline.fit``) holds it once more."""
    key = os.path.realpath(out)
    if key in _held:
        _held[key][1] += 1
        try:
            yield _held[key][0]
        finally:
            _held[key][1] -= 1
        return
    held = RunLock(out, say)
    held.acquire()
    _held[key] = [held, 1]
    try:
        yield held
    finally:
        del _held[key]
        held.release()
