"""One writer per caption output: an OS lock beside OUT.jsonl, and a note of who holds it.

    lock = OutputLock(Path("data/captions.jsonl"))
    lock.acquire()   # OutputLockedError naming the holder when another run writes the same output
    ...
    lock.release()

Two runs appending to one output would caption every image twice. The exclusion is an OS file lock
(flock through `filelock`) on `OUT.lock`: the kernel drops it when its process ends, even on
`kill -9`, so a crashed run never blocks the next one. A lock file says nothing about its holder, so
the holder writes `OUT.lock.json` (pid, host, start time, command) right after taking the lock and
removes it just before letting go. A refused run shows that record; a run that takes the lock and
still finds a record knows that the previous holder died without releasing, and says so.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("data_gen")


class OutputLockedError(ValueError):
    """Another live process holds the output's lock; the message names it and says what to do."""


def _stem(output: Path) -> str:
    return output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name


def lock_path(output: Path) -> Path:
    """`OUT.jsonl` -> `OUT.lock`: the file the OS lock is taken on (it stays, empty, after the run)."""
    return output.with_name(f"{_stem(output)}.lock")


def owner_path(output: Path) -> Path:
    """`OUT.jsonl` -> `OUT.lock.json`: who holds the lock, present only while a run holds it."""
    return output.with_name(f"{_stem(output)}.lock.json")


def read_owner(output: Path) -> dict[str, Any] | None:
    """The holder's record (pid, host, started, command), or None when there is none or it is unreadable."""
    try:
        owner = json.loads(owner_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def describe_owner(owner: dict[str, Any]) -> str:
    """`pid 1234 on host gpu-3 since 2025-06-01 12:03:04 (llava-kit caption photos -o ...)`."""
    text = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} since {owner.get('started', '?')}"
    return text + (f" ({owner['command']})" if owner.get("command") else "")


class OutputLock:
    """The exclusive right to write one caption output (OUT.jsonl and its errors and batch files)."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self._lock: Any = None

    def acquire(self) -> None:
        """Take the lock without waiting; OutputLockedError when another process holds it.

        A record left by a holder that died (killed, crashed, power loss) is taken over with a warning
        that names it: the OS has already dropped that holder's lock, so nobody else is writing.
        """
        from filelock import FileLock, Timeout  # here: `--help` and dry runs do not need it

        path = lock_path(self.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, thread_local=False)  # released by whichever thread closes the run
        try:
            lock.acquire(blocking=False)
        except Timeout:
            raise OutputLockedError(self._refusal(read_owner(self.output))) from None
        self._lock = lock
        try:
            previous = read_owner(self.output)
            if previous is not None:
                log.warning("%s: the run that held it, %s, ended without releasing it (killed or crashed); "
                            "taking it over. Its finished images are kept.", self.output, describe_owner(previous))
            self._write_owner()
        except BaseException:
            self.release()
            raise

    def _refusal(self, owner: dict[str, Any] | None) -> str:
        holder = describe_owner(owner) if owner else "another process (it has not recorded who it is yet)"
        return (f"{self.output} is being written by {holder}. Two runs on one output would caption every image "
                f"twice: wait for that run to finish or stop it, then rerun this command (finished images are "
                f"skipped). The lock is {lock_path(self.output)}; the OS frees it when its process ends.")

    def _write_owner(self) -> None:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        }
        path = owner_path(self.output)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(owner) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # atomic: a refused run never reads half a record

    def release(self) -> None:
        """Remove the holder's record, then let go of the lock (in that order: see the module docstring)."""
        if self._lock is None:
            return
        try:
            owner_path(self.output).unlink(missing_ok=True)
        finally:
            self._lock.release()
            self._lock = None
