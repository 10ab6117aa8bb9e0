"""OpenAI's fine-tuning API on the serve app: /v1/files and /v1/fine_tuning/jobs over the studio's jobs.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    upload = client.files.create(file=open("shapes.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-shapes", training_file=upload.id,
                                         hyperparameters={"n_epochs": 2})
    client.fine_tuning.jobs.list_events(job.id)          # newest first: queued, started, Step 1/12: training loss=...
    job = client.fine_tuning.jobs.retrieve(job.id)       # .status succeeded -> .fine_tuned_model
    client.chat.completions.create(model=job.fine_tuned_model, messages=[...])

Routes:

| route                                          | does                                                              |
|------------------------------------------------|-------------------------------------------------------------------|
| POST /v1/files                                 | upload training data (multipart `file`, `purpose` fine-tune), checked at once |
| GET /v1/files, /v1/files/ID, /v1/files/ID/content, DELETE /v1/files/ID | list, retrieve, download, delete  |
| POST /v1/fine_tuning/jobs                      | create a job: `model` (recipes.py), `training_file`, `validation_file`, `method`, `hyperparameters`, `suffix`, `seed` |
| GET /v1/fine_tuning/jobs, /v1/fine_tuning/jobs/ID | list (newest first, `after`, `limit`), retrieve              |
| POST /v1/fine_tuning/jobs/ID/cancel            | cancel                                                            |
| GET /v1/fine_tuning/jobs/ID/events             | the job's events, newest first: lifecycle, a loss per logged step |
| GET /v1/fine_tuning/jobs/ID/checkpoints        | the run's checkpoints and its final model, with their loss        |

A job is created `queued` once its request is checked (the files, the base, the method, the hyperparameters and the
whole run config), so a mistake is a 400 naming the field rather than a job that fails later; it never shows
`validating_files`. A job trains, then merges the run into STUDIO/models/ID, and succeeds with `fine_tuned_model`
(`ft:BASE[:SUFFIX]:ID`), which /v1/chat/completions serves from then on (models.py). Every client mistake is a 4xx in
OpenAI's error shape (serve/protocol.py), raised as ApiError.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from llava_kit.errors import ConfigError, LlavaKitError
from llava_kit.serve.protocol import ApiError
from llava_kit.studio.files import UploadError, add_upload
from llava_kit.studio.recipes import (
    FineTuneError,
    check_data_fits,
    fine_tune_config,
    method_stage,
    resolve_base,
)
from llava_kit.studio.runner import read_metrics
from llava_kit.studio.settings import StudioSettings
from llava_kit.studio.store import FileRecord, JobRecord, Store
from llava_kit.studio.workspace import Studio

MAX_JOB_BODY = 1 << 20
MAX_LIST = 100
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
SUFFIX = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ORGANIZATION = "llava-kit"


# ---------------------------------------------------------------------------------------------- requests

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class Hyperparameters(_Body):
    """OpenAI's hyperparameters; `auto` keeps the base's value (recipes.apply_hyperparameters)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # a misspelt one is refused, not ignored
    n_epochs: Any = "auto"
    batch_size: Any = "auto"
    learning_rate_multiplier: Any = "auto"
    beta: Any = "auto"
    """dpo only: train.preference.beta."""


class MethodHyperparameters(_Body):
    hyperparameters: Hyperparameters | None = None


class Method(_Body):
    type: str
    supervised: MethodHyperparameters | None = None
    dpo: MethodHyperparameters | None = None


class FineTuneRequest(_Body):
    """The fields of POST /v1/fine_tuning/jobs that llava-kit reads."""

    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    """Deprecated by OpenAI in favour of method.supervised.hyperparameters; still taken."""
    method: Method | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None


def _validation_error(err: ValidationError) -> ApiError:
    first = err.errors(include_url=False, include_context=False)[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    param = ".".join(str(part) for part in first["loc"] if isinstance(part, str) and re.fullmatch(r"[a-z_]+", part))
    if not param:
        return ApiError(400, "the request body must be a JSON object with `model` and `training_file`")
    return ApiError(400, f"{param}: {first['msg']}", param=param)


def _hyperparameters(body: FineTuneRequest) -> tuple[str, dict]:
    """(method, its hyperparameters checked): `auto` or a number in range each."""
    method = body.method.type if body.method else "supervised"
    given = body.hyperparameters
    if body.method is not None:
        section = getattr(body.method, method, None) if method in ("supervised", "dpo") else None
        if section is not None and section.hyperparameters is not None:
            given = section.hyperparameters
    values = given.model_dump() if given is not None else {}
    param = f"method.{method}.hyperparameters" if body.method is not None else "hyperparameters"
    checked = {}
    for name, kind, low in (("n_epochs", int, 1), ("batch_size", int, 1), ("learning_rate_multiplier", float, 0),
                            ("beta", float, 0)):
        value = values.get(name, "auto")
        if value == "auto":
            checked[name] = value
            continue
        if name == "beta" and method != "dpo":
            raise ApiError(400, f"{param}.beta is a hyperparameter of method dpo; this job is {method}: leave it out",
                           param=f"{param}.beta")
        ok = (isinstance(value, int) and not isinstance(value, bool)) if kind is int else \
            (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value))
        if not ok or value < low or (kind is int and value > 10_000) or (kind is float and value <= 0):
            what = f"an integer from {low}" if kind is int else "a number above 0"
            raise ApiError(400, f"{param}.{name} must be \"auto\" or {what}, got {value!r}", param=f"{param}.{name}")
        checked[name] = value
    return method, checked


# ---------------------------------------------------------------------------------------------- objects

def file_object(record: FileRecord) -> dict:
    """A `file` object as OpenAI returns it."""
    return {"id": record.id, "object": "file", "bytes": record.bytes, "created_at": int(record.created_at),
            "filename": record.filename, "purpose": record.purpose, "status": "processed", "status_details": None,
            "expires_at": None}


def job_object(job: JobRecord) -> dict:
    """A `fine_tuning.job` object of a fine-tuning job."""
    p, succeeded = job.params, job.status == "succeeded"
    error = None
    if job.status == "failed":
        error = {"code": "job_failed", "message": job.error or "the job failed", "param": None}
    return {"object": "fine_tuning.job", "id": job.id, "model": p.get("model"), "created_at": int(job.created_at),
            "finished_at": int(job.finished_at) if job.finished_at else None,
            "fine_tuned_model": job.result.get("fine_tuned_model") if succeeded else None,
            "organization_id": ORGANIZATION, "result_files": job.result.get("result_files", []), "status": job.status,
            "validation_file": p.get("validation_file"), "training_file": p.get("training_file"),
            "hyperparameters": p.get("hyperparameters", {}),
            "trained_tokens": job.result.get("trained_tokens") if succeeded else None, "error": error,
            "user_provided_suffix": p.get("suffix"), "seed": p.get("seed", 0), "estimated_finish": None,
            "integrations": [], "metadata": p.get("metadata"),
            "method": {"type": p.get("method", "supervised"),
                       p.get("method", "supervised"): {"hyperparameters": p.get("hyperparameters", {})}}}


def checkpoint_objects(job: JobRecord) -> list[dict]:
    """The run's complete checkpoints, and for a succeeded job its final model, newest first."""
    if not job.run_dir or not Path(job.run_dir).is_dir():
        return []
    metrics = read_metrics(job.run_dir)
    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m]
    name = job.params.get("fine_tuned_model", job.id)

    def entry(step: int, created: float, model: str) -> dict:
        logged = [loss for s, loss in losses if s <= step]
        return {"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{job.id}-{step}", "created_at": int(created),
                "fine_tuned_model_checkpoint": model, "fine_tuning_job_id": job.id, "step_number": step,
                "metrics": {"step": step, **({"train_loss": logged[-1]} if logged else {})}}

    final = max((m["step"] for m in metrics if isinstance(m.get("step"), int)), default=None)
    found = []
    if job.status == "succeeded" and final is not None:  # the final model stands for a checkpoint at its step
        found.append(entry(final, job.finished_at or job.created_at, name))
    for path in Path(job.run_dir).iterdir():
        match = CHECKPOINT.match(path.name)
        if match and path.is_dir() and not (found and int(match.group(1)) == final):
            found.append(entry(int(match.group(1)), path.stat().st_mtime, f"{name}:ckpt-step-{match.group(1)}"))
    return sorted(found, key=lambda c: c["step_number"], reverse=True)


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor page: the items after the one with id `after`, at most `limit`."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    data = items[:limit]
    return {"object": "list", "data": data, "has_more": len(items) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def _limit(value: str | None, default: int = 20) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIST:
        raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIST}, got {value!r}", param="limit")
    return int(value)


# ---------------------------------------------------------------------------------------------- routes

def studio_router(studio: Studio, settings: StudioSettings) -> APIRouter:
    """/v1/files and /v1/fine_tuning/jobs over `studio` (whose queue this server runs)."""
    router = APIRouter(prefix="/v1")

    # ------------------------------------------------------------------ files
    @router.post("/files")
    async def upload_file(request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        if not declared.isdigit():
            raise ApiError(411, "send the upload with a Content-Length header (as multipart/form-data)")
        if int(declared) > settings.max_upload_bytes + (1 << 20):  # the parts' headers take a little room
            raise ApiError(413, f"the upload is over this server's limit of {settings.max_upload_mb:g} MB "
                                "(--max-upload-mb)", param="file")
        try:
            with anyio.fail_after(settings.upload_timeout):
                form = await request.form(max_files=1, max_fields=16)
        except TimeoutError:
            raise ApiError(408, f"the upload did not arrive within {settings.upload_timeout:g} s "
                                "(--upload-timeout)") from None
        except Exception as err:  # noqa: BLE001 (a malformed multipart body is the client's)
            raise ApiError(400, f"the upload must be multipart/form-data with `file` and `purpose` ({err})") from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "`file` is missing: send the data file as the multipart field `file`",
                               param="file")
            if not isinstance(purpose, str):
                raise ApiError(400, "`purpose` is missing: send purpose=fine-tune", param="purpose")
            record = await run_in_threadpool(add_upload, studio.store, studio.root / "files", upload.file,
                                             upload.filename or "upload", purpose, settings.max_upload_bytes)
        except UploadError as err:
            raise ApiError(err.status, str(err), param=err.param, code="invalid_file") from None
        finally:
            await form.close()
        return file_object(record)

    @router.get("/files")
    async def list_files(purpose: str | None = None) -> dict:
        files = [file_object(f) for f in studio.store.files() if purpose is None or f.purpose == purpose]
        return {"object": "list", "data": files, "has_more": False}

    @router.get("/files/{file_id}")
    async def retrieve_file(file_id: str) -> dict:
        return file_object(_file(studio, file_id))

    @router.get("/files/{file_id}/content")
    async def file_content(file_id: str):
        record = _file(studio, file_id)
        return FileResponse(record.path, filename=Path(record.path).name)

    @router.delete("/files/{file_id}")
    async def delete_file(file_id: str) -> dict:
        record = _file(studio, file_id)
        users = [j.id for j in studio.store.jobs(("queued", "running"), ("fine-tune",))
                 if file_id in (j.params.get("training_file"), j.params.get("validation_file"))]
        if users:
            raise ApiError(400, f"file {file_id} is used by job {users[0]}, which has not finished; cancel it or "
                                "wait for it", param="file_id")
        studio.store.delete_file(record.id)
        return {"id": record.id, "object": "file", "deleted": True}

    # ------------------------------------------------------------------ fine-tuning jobs
    @router.post("/fine_tuning/jobs")
    async def create_job(request: Request) -> dict:
        raw = await _small_body(request)
        try:
            body = FineTuneRequest.model_validate_json(raw)
        except ValidationError as err:
            raise _validation_error(err) from None
        job = await run_in_threadpool(create_fine_tuning_job, studio, body)
        return job_object(job)

    @router.get("/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: str | None = None) -> dict:
        jobs = [job_object(j) for j in studio.store.jobs(kinds=("fine-tune",))]
        return _page(jobs, after, _limit(limit))

    @router.get("/fine_tuning/jobs/{job_id}")
    async def retrieve_job(job_id: str) -> dict:
        return job_object(_job(studio, job_id))

    @router.post("/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str) -> dict:
        _job(studio, job_id)
        try:
            return job_object(studio.cancel(job_id))
        except LlavaKitError as err:
            raise ApiError(400, str(err), param="fine_tuning_job_id") from None

    @router.get("/fine_tuning/jobs/{job_id}/events")
    async def list_events(job_id: str, after: str | None = None, limit: str | None = None) -> dict:
        _job(studio, job_id)
        before = None
        if after is not None:
            if not re.fullmatch(r"ftevent-\d+", after):
                raise ApiError(400, f"after must be an event id (ftevent-N), got {after!r}", param="after")
            before = int(after.removeprefix("ftevent-"))
        count = _limit(limit)
        events = studio.store.events(job_id, before=before, limit=count + 1)
        data = [{"object": "fine_tuning.job.event", "id": f"ftevent-{e.seq}", "created_at": int(e.created_at),
                 "level": e.level, "message": e.message, "data": e.data,
                 "type": e.type} for e in events[:count]]
        return {"object": "list", "data": data, "has_more": len(events) > count}

    @router.get("/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_checkpoints(job_id: str, after: str | None = None, limit: str | None = None) -> dict:
        job = _job(studio, job_id)
        return _page(await run_in_threadpool(checkpoint_objects, job), after, _limit(limit, 10))

    return router


async def _small_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_JOB_BODY:
        raise ApiError(413, f"a job's request body is at most {MAX_JOB_BODY} bytes")
    body = await request.body()
    if len(body) > MAX_JOB_BODY:
        raise ApiError(413, f"a job's request body is at most {MAX_JOB_BODY} bytes")
    return body


def _file(studio: Studio, file_id: str, param: str = "file_id") -> FileRecord:
    record = studio.store.file(file_id)
    if record is None:
        raise ApiError(404, f"No such File object: {file_id}", param=param, code="file_not_found")
    return record


def _job(studio: Studio, job_id: str) -> JobRecord:
    try:
        job = studio.store.job(job_id)
    except LlavaKitError:
        job = None
    if job is None or job.kind != "fine-tune":
        raise ApiError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="job_not_found")
    return job


def create_fine_tuning_job(studio: Studio, body: FineTuneRequest) -> JobRecord:
    """Check a fine-tuning request and queue its job (train, then merge); ApiError (4xx) naming what to fix."""
    method, hyperparameters = _hyperparameters(body)
    if body.integrations:
        raise ApiError(400, "integrations are not supported by this server (each job's metrics are its events and "
                            "its run's metrics.jsonl)", param="integrations")
    if body.suffix is not None and not SUFFIX.match(body.suffix):
        raise ApiError(400, f"suffix must be 1 to 64 letters, digits, `.`, `-` or `_`, got {body.suffix!r}",
                       param="suffix")
    training = _data_file(studio, body.training_file, "training_file")
    validation = _data_file(studio, body.validation_file, "validation_file") if body.validation_file else None
    job_id = Store.new_id("ftjob")
    try:
        base = resolve_base(body.model, studio.fine_tuned_models())
        stage = method_stage(method, base.config.get("stage", "sft"))
        check_data_fits(training.summary, stage, "training_file")
        if validation is not None:
            check_data_fits(validation.summary, stage, "validation_file")
        config, echoed = fine_tune_config(base, method, hyperparameters, training.path, training.image_root,
                                          str(studio.run_dir(job_id)), body.seed)
        name = f"ft:{base.name}:{body.suffix + ':' if body.suffix else ''}{job_id}"
        params = {"model": body.model, "training_file": training.id, "validation_file": body.validation_file,
                  "hyperparameters": echoed, "method": method, "suffix": body.suffix,
                  "seed": config.get("seed", 0), "metadata": body.metadata, "fine_tuned_model": name}
        job = studio.new_training_job(config, label=base.name, kind="fine-tune", job_id=job_id, params=params,
                                      merge=True)
    except FineTuneError as err:
        raise ApiError(400, str(err), param=err.param) from None
    except ConfigError as err:  # the whole run config, checked as `llava-kit train` checks it
        raise ApiError(400, f"this job's run config cannot train: {err}", param="hyperparameters") from None
    except LlavaKitError as err:
        raise ApiError(400, str(err), param="model") from None
    job = studio.submit(job)
    for note in base.notes:
        studio.store.add_event(job.id, f"Note: {note}", level="warn")
    if validation is not None:
        studio.store.add_event(job.id, "Note: validation_file was checked and is kept with the job; validation loss "
                                       "is not computed by this server yet", level="warn")
    return job


def _data_file(studio: Studio, file_id: str, param: str) -> FileRecord:
    record = studio.store.file(file_id)
    if record is None:
        raise ApiError(400, f"{param}: no file {file_id!r} on this server; upload it first (POST /v1/files)",
                       param=param, code="file_not_found")
    if record.purpose != "fine-tune":
        raise ApiError(400, f"{param}: file {file_id} has purpose {record.purpose!r}; upload training data with "
                            "purpose fine-tune", param=param)
    if not Path(record.path).is_file():
        raise ApiError(400, f"{param}: file {file_id}'s data is gone from the server ({record.path}); upload it again",
                       param=param)
    return record


__all__ = ["FineTuneRequest", "checkpoint_objects", "create_fine_tuning_job", "file_object", "job_object",
           "studio_router"]
