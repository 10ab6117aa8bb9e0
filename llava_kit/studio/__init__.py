"""The training studio: llava-kit commands as jobs (a queue of subprocesses recorded in SQLite), the OpenAI fine-tuning
API over them, and what the web UI's Train, Runs and Compare pages start and show.

- `store.py`      the record: jobs, uploaded files, job events (SQLite, schema versioned, safe across processes)
- `runner.py`     the queue: N subprocesses at once, logs, cancel, re-attaching after a server restart
- `workspace.py`  a studio directory (`Studio`): its layout, the jobs the pages start, finished jobs' models
- `files.py`      uploads checked by the data readers (JSONL, JSON, text, a zip with images), the data preview
- `recipes.py`    fine-tuning bases (recipe names, fine-tuned models, model directories) and OpenAI's hyperparameters
- `api.py`        /v1/files and /v1/fine_tuning/jobs on the serve app, in OpenAI's shapes
- `models.py`     finished jobs' models served by the server's model workers, loaded on first use

Importing this package imports neither torch nor FastAPI (`llava-kit jobs list` starts fast); api.py and models.py do.
"""

from llava_kit.studio.store import FINISHED, STATUSES, JobRecord, Store
from llava_kit.studio.workspace import KINDS, Studio

__all__ = ["FINISHED", "KINDS", "STATUSES", "JobRecord", "Store", "Studio"]
