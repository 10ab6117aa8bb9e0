"""The job queue: llava-kit commands as subprocesses, N at a time, recorded in the studio database.

    runner = Runner(store, Path("studio/jobs"), max_jobs=1).start()
    job = runner.submit(JobRecord(id=store.new_id("job"), kind="train", steps=[["train", "cfg.yaml"]]))
    runner.cancel(job.id)                     # SIGTERM to its process group, SIGKILL after the grace period
    wait_for_job(store, job.id, timeout=600)  # the job once it has finished (succeeded, failed or cancelled)
    runner.close()                            # the jobs keep running; the next runner re-attaches to them

A job is a list of steps, each a llava-kit argument list run as `python -m llava_kit.cli ARGS` with the job's log
file (STUDIO/jobs/ID/log.txt) as stdout and stderr, in a session of its own: it survives the server (a Ctrl-C in the
server's terminal does not reach it), and cancelling signals its whole process group. Each step runs under `sh`,
which writes the step's exit status to STUDIO/jobs/ID/exit-STEP: a server that restarted while the job ran is not the
process's parent and could not learn its exit status otherwise.

One thread (`_loop`) does everything, twice a second or when woken: it follows the processes it runs (their exit
status, their run's metrics.jsonl, which become events), stops those whose jobs were cancelled (by the API, a page
or `llava-kit jobs cancel` from a shell), and starts queued jobs while fewer than `max_jobs` run. Every state change
is a conditional update of the store, so a job cancelled while its process exits ends cancelled, never both.

When a runner starts, each job the database says is running is re-attached when its process is still alive (the same
pid *and* the same start time: a pid alone may have been reused), finished from its exit-status file when it ended
while no server watched it, and otherwise marked failed: "the server restarted and the process is gone". A lock file
keeps a second server from running the same studio's queue.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from llava_kit.errors import LlavaKitError, UsageError
from llava_kit.studio.store import ACTIVE, FINISHED, JobRecord, Store

logger = logging.getLogger(__name__)

LLAVA_KIT = (sys.executable, "-m", "llava_kit.cli")
"""How a step's arguments are run: this Python's llava-kit (the runner of tests may run something else)."""
LOG_FILE = "log.txt"
PROGRESS_FILE = "progress.json"  # written by the training engine (llava_kit/train/progress.py) as the run goes
METRICS_FILE = "metrics.jsonl"
ERROR_LINE = re.compile(r"^llava-kit [\w -]+: error: ")
# sh runs one step and writes its exit status where a restarted server can read it (atomically: write, then rename).
STEP_SCRIPT = 'status_file="$1"; shift; "$@"; code=$?; echo "$code" > "$status_file.tmp" && ' \
              'mv "$status_file.tmp" "$status_file"; exit "$code"'


class StudioBusyError(UsageError):
    """Another server runs this studio's queue."""


@dataclass
class _Process:
    """A step's process this runner follows: one it started (`popen`) or one it re-attached to after a restart."""

    pid: int
    started: float
    step: int
    popen: subprocess.Popen | None = None
    stop_deadline: float | None = None
    """Set once it has been sent SIGTERM (its job was cancelled): SIGKILL follows after this time."""

    def ended(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is not None
        return not process_alive(self.pid, self.started)


class Runner:
    """Runs a studio's queued jobs, `max_jobs` at once; see the module docstring."""

    def __init__(self, store: Store, jobs_dir: str | Path, max_jobs: int = 1, program: tuple[str, ...] = LLAVA_KIT,
                 on_success: Callable[[JobRecord], dict] | None = None, poll_s: float = 0.5,
                 cancel_grace_s: float = 10.0):
        if max_jobs < 1:
            raise UsageError(f"max_jobs must be at least 1, got {max_jobs}")
        self.store = store
        self.jobs_dir = Path(jobs_dir)
        self.max_jobs = max_jobs
        self.program = tuple(program)
        self.on_success = on_success
        """Called with a job whose last step succeeded, before it is marked succeeded: returns what goes into its
        `result` (a fine-tuned model's name, say); an exception fails the job with its message."""
        self.poll_s = poll_s
        self.cancel_grace_s = cancel_grace_s
        self._processes: dict[str, _Process] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llava-kit-studio-runner", daemon=True)
        self._lock_file = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Runner:
        """Take the studio's queue (StudioBusyError when another server has it), re-attach to or settle the jobs a
        previous server left running, and start following the queue; returns the runner."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = (self.jobs_dir / "runner.lock").open("a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            raise StudioBusyError(f"the studio {self.jobs_dir.parent} is already run by {holder}; stop that server "
                                  "or give this one another --studio directory") from None
        self._lock_file.truncate(0)
        self._lock_file.write(f"pid {os.getpid()}\n")
        self._lock_file.flush()
        self._recover()
        self._thread.start()
        return self

    def close(self, cancel_running: bool = False) -> None:
        """Stop following the queue. Running jobs keep running (the next runner re-attaches to them) unless
        `cancel_running`; idempotent."""
        if cancel_running:
            for job_id in list(self._processes):
                try:
                    self.cancel(job_id)
                except UsageError:  # it has finished meanwhile
                    pass
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        if cancel_running:
            for process in list(self._processes.values()):
                terminate_process(process.pid, process.started, self.cancel_grace_s)
                if process.popen is not None:
                    process.popen.wait()
        self._processes.clear()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    # ------------------------------------------------------------------ jobs
    def submit(self, job: JobRecord) -> JobRecord:
        """Queue a job; it starts when fewer than max_jobs run."""
        self.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        job = self.store.add_job(job)
        self._wake.set()
        return job

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job (its process is stopped by the runner's thread); UsageError when it has
        already finished."""
        job = cancel_job(self.store, job_id, terminate=job_id not in self._processes)
        self._wake.set()
        return job

    def job_dir(self, job_id: str) -> Path:
        """STUDIO/jobs/ID: the job's log, exit statuses and files."""
        return self.jobs_dir / job_id

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._follow_processes()
                self._start_queued()
            except Exception:  # noqa: BLE001 (the queue must keep running; the next tick tries again)
                logger.exception("studio runner: unexpected error; retrying")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _follow_processes(self) -> None:
        for job_id, process in list(self._processes.items()):
            job = self.store.job(job_id)
            if job.status != "running":  # cancelled (here, by the API, or from a shell): stop what still runs
                if process.ended():
                    del self._processes[job_id]
                else:
                    self._stop(process)
                continue
            self._read_metrics(job)
            if process.ended():
                del self._processes[job_id]
                self._step_ended(job, process)

    def _stop(self, process: _Process) -> None:
        """SIGTERM the process group once, then SIGKILL after the grace period."""
        now = time.monotonic()
        if process.stop_deadline is None:
            process.stop_deadline = now + self.cancel_grace_s
            signal_group(process.pid, signal.SIGTERM)
        elif now > process.stop_deadline:
            signal_group(process.pid, signal.SIGKILL)

    def _start_queued(self) -> None:
        free = self.max_jobs - self.store.count_running()
        if free <= 0:
            return
        for job in self.store.jobs(("queued",), newest_first=False, limit=free):
            try:
                process = self._spawn(job, 0)
            except OSError as err:
                self.store.transition(job.id, ("queued",), "failed", event=f"Job failed: cannot start: {err}",
                                      level="error", error=f"cannot start the process: {err}")
                continue
            # running with its pid in one step: whoever sees `running` can find the process
            if self.store.transition(job.id, ("queued",), "running", event="Job started", started_at=time.time(),
                                     step=0, pid=process.pid, pid_started=process.started):
                self._processes[job.id] = process
            else:  # cancelled while it was being started
                terminate_process(process.pid, process.started, self.cancel_grace_s)
                process.popen.wait()

    def _next_step(self, job: JobRecord, step: int) -> None:
        """Start step `step` of a running job."""
        try:
            process = self._spawn(job, step)
        except OSError as err:
            self.store.transition(job.id, ("running",), "failed", event=f"Job failed: cannot start: {err}",
                                  level="error", error=f"cannot start the process: {err}")
            return
        self.store.update_job(job.id, step=step, pid=process.pid, pid_started=process.started)
        self.store.add_event(job.id, f"Step {step + 1}/{len(job.steps)} started: llava-kit {job.steps[step][0]}")
        self._processes[job.id] = process

    def _spawn(self, job: JobRecord, step: int) -> _Process:
        """Start the process of one step of a job, its output appended to the job's log; OSError when it cannot."""
        args = job.steps[step]
        self.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        command = ["/bin/sh", "-c", STEP_SCRIPT, "sh", str(self.exit_file(job.id, step)), *self.program, *args]
        with (self.job_dir(job.id) / LOG_FILE).open("ab") as log:
            log.write(f"\n=== step {step + 1}/{len(job.steps)}: llava-kit {shlex.join(args)}\n".encode())
            log.flush()
            popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=job.cwd or None,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return _Process(popen.pid, process_start_time(popen.pid) or time.time(), step, popen)

    def _step_ended(self, job: JobRecord, process: _Process) -> None:
        """A running job's step has exited: start the next step, or finish the job."""
        code = self.exit_status(job.id, process.step)
        if code is None and process.popen is not None:
            code = process.popen.returncode  # negative: the signal that killed it
        if code == 0 and process.step + 1 < len(job.steps):
            self._next_step(job, process.step + 1)
        elif code == 0:
            self._succeed(job)
        else:
            reason = failure_reason(self.job_dir(job.id) / LOG_FILE, code)
            self.store.transition(job.id, ("running",), "failed", event=f"Job failed: {reason}", level="error",
                                  error=reason)

    def _succeed(self, job: JobRecord) -> None:
        self._read_metrics(self.store.job(job.id))  # the run's last lines (its summary) before the end
        try:
            result = {**job.result, **(self.on_success(job) if self.on_success else {})}
        except Exception as err:  # noqa: BLE001 (whatever it is, the job must end, with the reason)
            if not isinstance(err, LlavaKitError | OSError):
                logger.exception("studio: finishing job %s failed", job.id)
            reason = str(err) if isinstance(err, LlavaKitError | OSError) else f"internal error: {err!r}"
            self.store.transition(job.id, ("running",), "failed", event=f"Job failed: {reason}", level="error",
                                  error=reason)
            return
        self.store.transition(job.id, ("running",), "succeeded", event="The job has successfully completed",
                              result=result)

    def _recover(self) -> None:
        """Settle the jobs the database says are running, after a server (re)start."""
        for job in self.store.jobs(("running",), newest_first=False):
            if job.pid is not None and process_alive(job.pid, job.pid_started):
                self._processes[job.id] = _Process(job.pid, job.pid_started, job.step)
                self.store.add_event(job.id, f"Re-attached to the job's running process (pid {job.pid}) after a "
                                             "server restart")
                logger.info("studio: re-attached to job %s (pid %d)", job.id, job.pid)
            elif job.pid is not None and self.exit_status(job.id, job.step) is not None:
                self._step_ended(job, _Process(job.pid, job.pid_started or 0.0, job.step))  # it ended meanwhile
            else:
                reason = "the server restarted and the process is gone" + (f" (pid {job.pid})" if job.pid else "")
                self.store.transition(job.id, ("running",), "failed", event=f"Job failed: {reason}", level="error",
                                      error=reason)

    # ------------------------------------------------------------------ files of a job
    def exit_file(self, job_id: str, step: int) -> Path:
        return self.job_dir(job_id) / f"exit-{step}"

    def exit_status(self, job_id: str, step: int) -> int | None:
        """A step's exit status as its `sh` wrote it, or None (still running, or killed before it could)."""
        try:
            return int(self.exit_file(job_id, step).read_text().strip())
        except (OSError, ValueError):
            return None

    def _read_metrics(self, job: JobRecord) -> None:
        """Turn the new lines of the run's metrics.jsonl into events (loss per logged step, the run's summary)."""
        if not job.run_dir:
            return
        lines = read_complete_lines(Path(job.run_dir) / METRICS_FILE)
        if len(lines) <= job.metrics_seen:
            return  # nothing new (or the file is being rewritten at the end of the run: read it next time)
        total = read_progress(job.run_dir).get("max_steps")
        events = []
        for line in lines[job.metrics_seen:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            events.append(metrics_event(entry, total))
        self.store.add_metrics(job.id, len(lines), events)


# ---------------------------------------------------------------------------------------------- processes

def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def process_alive(pid: int, started: float | None) -> bool:
    """Whether process `pid` still runs and is the one that started at `started` (not a later one given the same
    pid); a zombie (exited, not yet reaped) has ended."""
    try:
        process = psutil.Process(pid)
        if started is not None and abs(process.create_time() - started) > 0.05:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to the process group `pid` leads (a job's step and every process it started)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def terminate_process(pid: int, started: float | None, grace_s: float) -> None:
    """Stop process `pid` (if it is still the one that started at `started`) and its group: SIGTERM, then SIGKILL
    for whatever is left after `grace_s` seconds. Returns once they have gone."""
    if not process_alive(pid, started):
        return
    try:
        leader = psutil.Process(pid)
        processes = [leader, *leader.children(recursive=True)]
    except psutil.Error:
        return
    signal_group(pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    if alive:
        signal_group(pid, signal.SIGKILL)
        for process in alive:  # also any that left the group
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)


def cancel_job(store: Store, job_id: str, terminate: bool = True, grace_s: float = 10.0) -> JobRecord:
    """Cancel a queued or running job; with `terminate` also stop its process here (what `llava-kit jobs cancel`
    does: a server's runner stops the processes it follows itself). UsageError when the job has already finished."""
    job = store.job(job_id)
    if job.finished:
        raise UsageError(f"job {job_id} has already {job.status}; only queued or running jobs can be cancelled")
    if store.transition(job_id, ("queued",), "cancelled", event="Job cancelled before it started",
                        error="cancelled before it started"):
        return store.job(job_id)
    if store.transition(job_id, ("running",), "cancelled", event="Job cancelled; its process is being stopped",
                        error="cancelled while running"):
        job = store.job(job_id)
        if terminate and job.pid is not None:
            terminate_process(job.pid, job.pid_started, grace_s)
    return store.job(job_id)


def wait_for_job(store: Store, job_id: str, statuses: tuple[str, ...] = FINISHED, timeout: float = 600.0,
                 poll_s: float = 0.2) -> JobRecord:
    """The job once its status is one of `statuses` (by default: once it has finished); TimeoutError naming its
    status after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        job = store.job(job_id)
        if job.status in statuses:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {job.status} after {timeout:g} s (waiting for "
                               f"{' or '.join(statuses)})")
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------- logs and metrics

def tail(path: str | Path, lines: int = 200, max_bytes: int = 256 * 1024) -> list[str]:
    """The last `lines` lines of a text file as a terminal shows them (a progress bar redrawn with \r is one line, at
    its latest state; read from the file's end: logs grow long), [] when it does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    kept = []
    for raw in data.decode("utf-8", errors="replace").split("\n"):
        # a progress bar redraws its line after \r: show the line as a terminal would, at its last drawing
        drawn = [part for part in raw.split("\r") if part.strip()]
        if drawn:
            kept.append(drawn[-1])
    return kept[-lines:]


def failure_reason(log_path: Path, code: int | None) -> str:
    """Why a step failed, from the end of its log: llava-kit's own error message when it gave one (a user error:
    the message says what to fix), else the exit status and the log's last lines (a traceback's end)."""
    lines = tail(log_path, 80)
    for i in range(len(lines) - 1, -1, -1):
        if ERROR_LINE.match(lines[i]):
            return "\n".join(lines[i:]).strip()
    how = "no exit status (killed?)" if code is None else (
        f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}")
    return f"the process ended with {how}; the log ends:\n" + "\n".join(lines[-10:])


def read_complete_lines(path: Path) -> list[str]:
    """The complete lines of a file another process appends to (a last line without its newline is left for the
    next read), [] when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def read_progress(run_dir: str | Path) -> dict:
    """RUN_DIR/progress.json (step, max_steps, epoch, trained_tokens), {} before training has started."""
    try:
        return json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's metrics.jsonl entries so far (the Trainer's log history)."""
    entries = []
    for line in read_complete_lines(Path(run_dir) / METRICS_FILE):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def metrics_event(entry: dict, total_steps: int | None) -> tuple[str, dict]:
    """(message, data) of the event for one metrics.jsonl entry, worded like OpenAI's fine-tuning events."""
    step = entry.get("step")
    of = f"/{total_steps}" if total_steps else ""
    if "loss" in entry:
        data = {"step": step, "total_steps": total_steps, "train_loss": entry["loss"],
                **{k: entry[k] for k in ("learning_rate", "grad_norm", "epoch") if k in entry}}
        return f"Step {step}{of}: training loss={entry['loss']:.4f}", data
    if entry.get("final_weights") == "best":  # train.keep_best (llava_kit/train/engine.py: final_weights)
        return (f"Final weights: the best checkpoint, {entry.get('checkpoint')} at step {step} (eval loss "
                f"{entry.get('eval_loss', float('nan')):.4f})"), dict(entry)
    if entry.get("final_weights") == "last":
        return f"Final weights: the last step's ({step})", dict(entry)
    if "train_runtime" in entry:
        mean = f", mean loss {entry['train_loss']:.4f}" if "train_loss" in entry else ""
        return f"Training finished: {step} steps in {entry['train_runtime']:.1f} s{mean}", {"step": step, **entry}
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if k != "step")
    return f"Step {step}{of}: {values}", dict(entry)


__all__ = ["ACTIVE", "FINISHED", "LLAVA_KIT", "Runner", "StudioBusyError", "cancel_job", "failure_reason",
           "metrics_event", "process_alive", "read_metrics", "read_progress", "tail", "terminate_process",
           "wait_for_job"]
