"""The studio's record: jobs, uploaded files and job events in one SQLite database (STUDIO/studio.db).

    store = Store(Path("studio/studio.db"))
    job = store.add_job(JobRecord(id=store.new_id("job"), kind="train", steps=[["train", "cfg.yaml"]]))
    store.transition(job.id, ("queued",), "running", pid=1234)      # True: it was queued, now it runs
    store.add_event(job.id, "Step 3/10: training loss=1.23", type="metrics", data={"step": 3})

Several threads and processes share one database (the server's runner, its API requests, `llava-kit jobs cancel` in a
shell): each operation opens its own short connection, WAL lets readers read beside a writer, a writer waits up to
30 s for the lock, and writes run in `BEGIN IMMEDIATE` transactions. A job's state moves only by a conditional update
(`transition`: `WHERE status IN (...)`), so when two writers race (a cancel and the process's exit, say) the second
finds the job moved and changes nothing.

The schema is versioned (`PRAGMA user_version`): `Store` creates it, brings an older database up to SCHEMA_VERSION
and refuses one written by a newer llava-kit.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from llava_kit.errors import LlavaKitError, UsageError

SCHEMA_VERSION = 1
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")

# Each migration brings the schema from the version before it to its own number (index + 1).
MIGRATIONS = [
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,            -- train, fine-tune, merge, export, compare-projectors, eval, caption
        label TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL,          -- queued, running, succeeded, failed, cancelled
        steps TEXT NOT NULL,           -- JSON: llava-kit argument lists, run one after the other
        step INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        pid INTEGER,                   -- the running step's process and its start time (the same pid, later, may be
        pid_started REAL,              -- another process)
        run_dir TEXT,
        cwd TEXT,                      -- the folder its commands run in (relative paths in them are from there)
        error TEXT,
        metrics_seen INTEGER NOT NULL DEFAULT 0,
        params TEXT NOT NULL DEFAULT '{}',
        result TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX jobs_status ON jobs (status, created_at);
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at REAL NOT NULL,
        path TEXT NOT NULL,            -- the data file (inside a zip's extracted folder for a zip)
        image_root TEXT NOT NULL,
        summary TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        level TEXT NOT NULL DEFAULT 'info',
        type TEXT NOT NULL DEFAULT 'message',
        message TEXT NOT NULL,
        data TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_job ON events (job_id, seq);
    """,
]
assert len(MIGRATIONS) == SCHEMA_VERSION

JSON_COLUMNS = {"steps", "params", "result", "summary", "data"}


class StudioStoreError(LlavaKitError):
    """The studio database cannot be used (written by a newer llava-kit, or not a database)."""


@dataclass
class JobRecord:
    """One job: a llava-kit command (or a few, run in turn) as a subprocess, and what became of it."""

    id: str
    kind: str
    steps: list[list[str]]
    """llava-kit argument lists (`["train", "config.yaml"]`), run one after the other while each succeeds."""
    label: str = ""
    """What the job is about, for lists (a run's name, a base model)."""
    status: str = "queued"
    step: int = 0
    """The step running now (or to run next)."""
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = None
    pid_started: float | None = None
    run_dir: str | None = None
    """The run directory a training job writes (its metrics, progress and loss plot are read from there)."""
    cwd: str | None = None
    """The folder its commands run in (None: the server's); relative paths in its arguments are from there."""
    error: str | None = None
    """Why it failed or was cancelled."""
    metrics_seen: int = 0
    """Lines of the run's metrics.jsonl already turned into events."""
    params: dict = field(default_factory=dict)
    """What its creator keeps with it (the fine-tuning API's request, the Train page's choices)."""
    result: dict = field(default_factory=dict)
    """What it produced (fine_tuned_model, model_dir, trained_tokens)."""

    @property
    def finished(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.status in FINISHED


@dataclass
class FileRecord:
    """An uploaded data file, checked by the data readers when it arrived."""

    id: str
    filename: str
    purpose: str
    bytes: int
    path: str
    image_root: str
    created_at: float = field(default_factory=time.time)
    summary: dict = field(default_factory=dict)
    """What the check found: records, formats, whether records have images, `kind` (conversations or text)."""


@dataclass
class EventRecord:
    """One line of a job's story (queued, started, a step's loss, finished, why it failed)."""

    seq: int
    job_id: str
    created_at: float
    level: str
    type: str
    message: str
    data: dict


class Store:
    """The studio database at `path` (created with its folder when missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    # ------------------------------------------------------------------ connections
    @contextlib.contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as err:
            raise StudioStoreError(f"cannot open the studio database {self.path}: {err}") from None
        connection.row_factory = sqlite3.Row
        try:
            connection.execute("PRAGMA busy_timeout = 30000")
            if write:
                connection.execute("BEGIN IMMEDIATE")  # the write lock now: no other writer can interleave
            yield connection
            if write:
                connection.execute("COMMIT")
        except BaseException:
            if write and connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        finally:
            connection.close()

    def _migrate(self) -> None:
        try:
            with self._connect() as connection:
                connection.execute("PRAGMA journal_mode = WAL")  # persistent: readers never wait for a writer
            with self._connect(write=True) as connection:
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StudioStoreError(f"the studio database {self.path} has schema version {version}, newer than "
                                           f"this llava-kit's ({SCHEMA_VERSION}); upgrade llava-kit or use another "
                                           "studio directory")
                for number in range(version, SCHEMA_VERSION):
                    for statement in MIGRATIONS[number].split(";"):
                        if statement.strip():
                            connection.execute(statement)
                    connection.execute(f"PRAGMA user_version = {number + 1}")
        except sqlite3.DatabaseError as err:
            raise StudioStoreError(f"{self.path} is not a usable studio database ({err}); move it away or use "
                                   "another studio directory") from None

    @staticmethod
    def new_id(prefix: str) -> str:
        """A new id such as `ftjob-3f9c0a1b2c4d` (unique enough for one studio: 48 random bits)."""
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    # ------------------------------------------------------------------ jobs
    def add_job(self, job: JobRecord) -> JobRecord:
        """Record a new job (queued) and its first event."""
        row = _to_row(job)
        with self._connect(write=True) as connection:
            connection.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                               list(row.values()))
            _insert_event(connection, job.id, f"Job created: {job.kind} {job.label}".strip(), "info", "message", {})
        return job

    def job(self, job_id: str) -> JobRecord:
        """The job `job_id`; UsageError naming it when there is none."""
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJobError(f"no job {job_id!r} in this studio ({self.path.parent}); `llava-kit jobs list` "
                                  "lists them")
        return _from_row(JobRecord, row)

    def jobs(self, statuses: tuple[str, ...] | None = None, kinds: tuple[str, ...] | None = None,
             newest_first: bool = True, limit: int | None = None) -> list[JobRecord]:
        """Jobs, optionally of some statuses and kinds, newest (or oldest) first."""
        where, values = [], []
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            values += statuses
        if kinds:
            where.append(f"kind IN ({', '.join('?' * len(kinds))})")
            values += kinds
        query = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        query += f" ORDER BY created_at {'DESC' if newest_first else 'ASC'}, rowid {'DESC' if newest_first else 'ASC'}"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        with self._connect() as connection:
            return [_from_row(JobRecord, row) for row in connection.execute(query, values)]

    def transition(self, job_id: str, from_statuses: tuple[str, ...], to_status: str, event: str | None = None,
                   level: str = "info", **changes) -> bool:
        """Move the job to `to_status` (with `changes` to other columns) if it is in one of `from_statuses`, and
        record `event`; False (nothing changed) when it was not."""
        assert to_status in STATUSES, to_status
        changes = {"status": to_status, **changes}
        if to_status in FINISHED:
            changes.setdefault("finished_at", time.time())
        row = _to_row(changes)
        with self._connect(write=True) as connection:
            moved = connection.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in row)} WHERE id = ? AND "
                f"status IN ({', '.join('?' * len(from_statuses))})", [*row.values(), job_id, *from_statuses])
            if moved.rowcount and event:
                _insert_event(connection, job_id, event, level, "message", {})
        return bool(moved.rowcount)

    def update_job(self, job_id: str, **changes) -> None:
        """Change columns of a job other than its status (the running step's pid, the result)."""
        assert "status" not in changes, "a job's status moves only by transition()"
        row = _to_row(changes)
        with self._connect(write=True) as connection:
            connection.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in row)} WHERE id = ?",
                               [*row.values(), job_id])

    def count_running(self) -> int:
        """Jobs running now (by any process sharing this studio)."""
        with self._connect() as connection:
            return connection.execute("SELECT COUNT(*) FROM jobs WHERE status = 'running'").fetchone()[0]

    # ------------------------------------------------------------------ events
    def add_event(self, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict | None = None) -> None:
        """Add one event to a job's story."""
        with self._connect(write=True) as connection:
            _insert_event(connection, job_id, message, level, type, data or {})

    def add_metrics(self, job_id: str, seen: int, events: list[tuple[str, dict]]) -> None:
        """Add metrics events (message, data) read from a run's metrics.jsonl and remember how many lines were read,
        in one transaction (so a line is never turned into an event twice)."""
        with self._connect(write=True) as connection:
            for message, data in events:
                _insert_event(connection, job_id, message, "info", "metrics", data)
            connection.execute("UPDATE jobs SET metrics_seen = ? WHERE id = ?", (seen, job_id))

    def events(self, job_id: str, before: int | None = None, limit: int = 20,
               newest_first: bool = True) -> list[EventRecord]:
        """A job's events, newest first (OpenAI's order), those before sequence number `before` when given."""
        query = "SELECT * FROM events WHERE job_id = ?" + (" AND seq < ?" if before is not None else "")
        query += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        values = [job_id, *([before] if before is not None else []), int(limit)]
        with self._connect() as connection:
            return [_from_row(EventRecord, row) for row in connection.execute(query, values)]

    # ------------------------------------------------------------------ files
    def add_file(self, record: FileRecord) -> FileRecord:
        """Record an uploaded file."""
        row = _to_row(record)
        with self._connect(write=True) as connection:
            connection.execute(f"INSERT INTO files ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                               list(row.values()))
        return record

    def file(self, file_id: str) -> FileRecord | None:
        """The uploaded file `file_id`, or None."""
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if row is None else _from_row(FileRecord, row)

    def files(self) -> list[FileRecord]:
        """Every uploaded file, newest first."""
        with self._connect() as connection:
            return [_from_row(FileRecord, row)
                    for row in connection.execute("SELECT * FROM files ORDER BY created_at DESC, rowid DESC")]

    def delete_file(self, file_id: str) -> bool:
        """Forget an uploaded file; False when there was none."""
        with self._connect(write=True) as connection:
            return bool(connection.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount)


class UnknownJobError(UsageError):
    """No job has that id."""


def _insert_event(connection: sqlite3.Connection, job_id: str, message: str, level: str, type: str,
                  data: dict) -> None:
    connection.execute("INSERT INTO events (job_id, created_at, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?)",
                       (job_id, time.time(), level, type, message, json.dumps(data)))


def _to_row(record) -> dict:
    """A record (dataclass or dict) -> column values, JSON columns encoded."""
    values = {f.name: getattr(record, f.name) for f in fields(record)} if not isinstance(record, dict) else record
    return {k: json.dumps(v) if k in JSON_COLUMNS else v for k, v in values.items()}


def _from_row(cls, row: sqlite3.Row):
    names = {f.name for f in fields(cls)}
    return cls(**{k: json.loads(row[k]) if k in JSON_COLUMNS else row[k] for k in row.keys() if k in names})
