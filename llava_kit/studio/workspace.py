"""A studio directory: its record, its jobs' folders, runs, models and uploads; the jobs the pages and the API start.

    studio = Studio("~/.cache/llava-kit/studio")
    studio.start(max_jobs=1)                               # in a server: run the queue (re-attaching to running jobs)
    job = studio.submit_train(config_dict, label="shapes") # a run of any stage, into STUDIO/runs/ID
    studio.merge(job.id); studio.export(job.id); studio.resume(job.id); studio.cancel(job.id)
    studio.submit_command(["eval", "--model", "m", "--data", "q.jsonl", "--image-root", "img"])   # any command
    studio.fine_tuned_models()                             # {"ft:shapes:job-...": STUDIO/models/job-...}
    studio.close()                                         # running jobs keep running

Layout:

    STUDIO/studio.db        jobs, files and events (store.py)
    STUDIO/files/ID/        uploads (a zip extracted beside it)
    STUDIO/jobs/ID/         a job's log.txt, config, exit statuses
    STUDIO/runs/ID/         the run directory of a training job
    STUDIO/models/ID/       the merged model of a training job (a fine-tuning job merges itself; Merge on the Runs page)
    STUDIO/exports/ID/      hf-llava exports

A training job that succeeds gets a model name, `fine_tuned_model` (`ft:BASE:JOB_ID`), under which the server serves it
(its merged model, or its run directory until merged): `on_model` listeners hear of each one.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from pathlib import Path

from llava_kit.errors import UsageError
from llava_kit.schema import dump_yaml, load_yaml_file
from llava_kit.studio.runner import (
    LLAVA_KIT,
    LOG_FILE,
    Runner,
    cancel_job,
    read_metrics,
    read_progress,
    tail,
)
from llava_kit.studio.store import FileRecord, JobRecord, Store

logger = logging.getLogger(__name__)

TRAINING_KINDS = ("train", "fine-tune")
COMMANDS = ("train", "merge", "export", "compare-projectors", "eval", "caption")
"""The llava-kit commands a job may run."""
KINDS = ("fine-tune", *COMMANDS)


class Studio:
    """The studio directory `root` (created when missing); `start` runs its queue in this process."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        for folder in ("files", "jobs", "runs", "models", "exports"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.store = Store(self.root / "studio.db")
        self.runner: Runner | None = None
        self.on_model: list[Callable[[str, Path], None]] = []
        """Called with (fine_tuned_model, model directory) when a training job succeeds (or is merged)."""

    # ------------------------------------------------------------------ lifecycle
    def start(self, max_jobs: int = 1, program: tuple[str, ...] = LLAVA_KIT, poll_s: float = 0.5,
              cancel_grace_s: float = 10.0) -> Studio:
        """Run the queue in this process (`max_jobs` at once); returns the studio."""
        self.runner = Runner(self.store, self.root / "jobs", max_jobs, program, on_success=self._succeeded,
                             poll_s=poll_s, cancel_grace_s=cancel_grace_s).start()
        return self

    def close(self, cancel_running: bool = False) -> None:
        """Stop running the queue; running jobs keep running (a later server re-attaches) unless `cancel_running`."""
        if self.runner is not None:
            self.runner.close(cancel_running)
            self.runner = None

    # ------------------------------------------------------------------ paths
    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def run_dir(self, job_id: str) -> Path:
        return self.root / "runs" / job_id

    def model_dir(self, job_id: str) -> Path:
        return self.root / "models" / job_id

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / LOG_FILE

    # ------------------------------------------------------------------ starting jobs
    def submit(self, job: JobRecord) -> JobRecord:
        """Queue a job (it runs once a server runs this studio's queue)."""
        if job.kind not in KINDS:
            raise UsageError(f"unknown job kind {job.kind!r}; valid: {', '.join(KINDS)}")
        self.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        if self.runner is not None:
            return self.runner.submit(job)
        return self.store.add_job(job)

    def new_training_job(self, config: dict, label: str, kind: str = "train", job_id: str | None = None,
                         params: dict | None = None, merge: bool = False) -> JobRecord:
        """A training job for a run config (a dict; its output_dir becomes STUDIO/runs/ID), not yet submitted: the
        config is validated first (ConfigError listing every problem) and written to STUDIO/jobs/ID/config.yaml.
        With `merge` the job merges the run into STUDIO/models/ID when training succeeds."""
        from llava_kit.config import config_from_dict, save_config

        job_id = job_id or Store.new_id("job")
        config = {**config, "output_dir": str(self.run_dir(job_id))}
        cfg = config_from_dict(config, f"the run config of {label or job_id}")
        self.job_dir(job_id).mkdir(parents=True, exist_ok=True)
        config_path = self.job_dir(job_id) / "config.yaml"
        save_config(cfg, config_path)
        steps = [["train", str(config_path)]]
        if merge:
            steps.append(["merge", cfg.output_dir, "-o", str(self.model_dir(job_id))])
        name = (params or {}).get("fine_tuned_model") or f"ft:{label or cfg.stage}:{job_id}"
        return JobRecord(id=job_id, kind=kind, label=label or cfg.stage, steps=steps, run_dir=cfg.output_dir,
                         params={"stage": cfg.stage, **(params or {}), "fine_tuned_model": name})

    def submit_train(self, config: dict, label: str = "", merge: bool = False) -> JobRecord:
        """Queue a training run of any stage (see new_training_job)."""
        return self.submit(self.new_training_job(config, label, merge=merge))

    def resume(self, job_id: str) -> JobRecord:
        """Queue a training job that continues a previous one's run from its newest checkpoint (or from the start
        when it saved none)."""
        previous = self._training_job(job_id)
        if previous.status in ("queued", "running"):
            raise UsageError(f"job {job_id} is {previous.status}; resume a job that has ended")
        config = load_yaml_file(self.job_dir(job_id) / "config.yaml")
        config.setdefault("train", {})["resume_from_checkpoint"] = "latest"
        new_id = Store.new_id("job")
        config_path = self.job_dir(new_id) / "config.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(dump_yaml(config))
        return self.submit(JobRecord(id=new_id, kind="train", label=previous.label, steps=[["train", str(config_path)]],
                                     run_dir=previous.run_dir,
                                     params={**previous.params, "resumed": job_id,
                                             "fine_tuned_model": f"ft:{previous.label}:{new_id}"}))

    def merge(self, job_id: str) -> JobRecord:
        """Queue a merge of a succeeded training job's run into STUDIO/models/JOB_ID (its model is served from there)."""
        job = self._training_job(job_id, succeeded=True)
        return self.submit(JobRecord(id=Store.new_id("job"), kind="merge", label=job.label,
                                     steps=[["merge", job.run_dir, "-o", str(self.model_dir(job_id))]],
                                     params={"of": job_id}))

    def export(self, job_id: str) -> JobRecord:
        """Queue an hf-llava export of a succeeded training job's model (merged when it has been, else its run)."""
        job = self._training_job(job_id, succeeded=True)
        new_id = Store.new_id("job")
        source = job.result.get("model_dir") or job.run_dir
        return self.submit(JobRecord(id=new_id, kind="export", label=job.label,
                                     steps=[["export", source, "--format", "hf-llava", "-o",
                                             str(self.root / "exports" / new_id)]], params={"of": job_id}))

    def compare(self, config_path: str, projectors: list[str] | None = None) -> JobRecord:
        """Queue `llava-kit compare-projectors` on a comparison config; its runs and report go to STUDIO/runs/ID."""
        source = Path(config_path)
        if not source.is_file():
            raise UsageError(f"comparison config {config_path!r} does not exist")
        config = load_yaml_file(source)
        if not isinstance(config, dict):
            raise UsageError(f"{config_path} is not a comparison config (a mapping of keys)")
        new_id = Store.new_id("job")
        config["output_dir"] = str(self.run_dir(new_id))
        written = self.job_dir(new_id) / "compare.yaml"
        written.parent.mkdir(parents=True, exist_ok=True)
        written.write_text(dump_yaml(config))
        args = ["compare-projectors", str(written), "--report", str(self.run_dir(new_id) / "comparison.md")]
        if projectors:
            args += ["--projectors", ",".join(projectors)]
        return self.submit(JobRecord(id=new_id, kind="compare-projectors", label=source.stem, steps=[args],
                                     params={"config": str(source), "projectors": projectors or []}))

    def submit_command(self, args: list[str], cwd: str | Path | None = None, label: str = "") -> JobRecord:
        """Queue any llava-kit command of COMMANDS as a job (`["eval", "--model", "m", ...]`), run in `cwd` (default:
        this process's folder). A `train` command's config is checked now, and its run is followed like the Train
        page's (its output_dir is the job's run directory)."""
        if not args or args[0] not in COMMANDS:
            raise UsageError(f"a job runs one of the llava-kit commands {', '.join(COMMANDS)}; got "
                             f"{' '.join(args[:1]) or 'nothing'}")
        cwd = Path(cwd or Path.cwd()).resolve()
        run_dir, params = None, {}
        if args[0] == "train":
            from llava_kit.config import load_config

            overrides = [a for a in args[2:] if "=" in a and not a.startswith("-")]
            if len(args) < 2 or not (cwd / args[1]).is_file():
                raise UsageError(f"`train` needs a config file; {' '.join(args[1:2]) or 'none'} is not one (from "
                                 f"{cwd})")
            cfg = load_config(cwd / args[1], overrides)
            run_dir = str((cwd / cfg.output_dir).resolve())
            label = label or Path(run_dir).name
        job_id = Store.new_id("job")
        if run_dir:
            params["fine_tuned_model"] = f"ft:{label}:{job_id}"
        return self.submit(JobRecord(id=job_id, kind=args[0], label=label or args[0], steps=[list(args)],
                                     run_dir=run_dir, cwd=str(cwd), params=params))

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job (UsageError when it has ended)."""
        if self.runner is not None:
            return self.runner.cancel(job_id)
        return cancel_job(self.store, job_id)

    def _training_job(self, job_id: str, succeeded: bool = False) -> JobRecord:
        job = self.store.job(job_id)
        if job.kind not in TRAINING_KINDS or not job.run_dir:
            raise UsageError(f"job {job_id} is a {job.kind} job, not a training run")
        if succeeded and job.status != "succeeded":
            raise UsageError(f"job {job_id} has {'not finished' if not job.finished else job.status}; only a "
                             "succeeded training run can be merged or exported")
        return job

    # ------------------------------------------------------------------ finished jobs
    def _succeeded(self, job: JobRecord) -> dict:
        """The result of a job that succeeded (the runner's on_success): a training run's model name, model
        directory and trained tokens; a merge moves its run's model to the merged directory."""
        if job.kind in TRAINING_KINDS:
            model_dir = self.model_dir(job.id) if self.model_dir(job.id).is_dir() else Path(job.run_dir)
            name = job.params.get("fine_tuned_model") or f"ft:{job.label or job.kind}:{job.id}"
            result = {"fine_tuned_model": name, "model_dir": str(model_dir),
                      "trained_tokens": read_progress(job.run_dir).get("trained_tokens")}
            if job.kind == "fine-tune":
                result["result_files"] = [self._results_file(job).id]
            self.store.add_event(job.id, f"New fine-tuned model created: {name}")
            self._announce(name, model_dir)
            return result
        if job.kind == "merge" and job.params.get("of"):
            run_job = self.store.job(job.params["of"])
            if run_job.result.get("fine_tuned_model"):
                self.store.update_job(run_job.id, result={**run_job.result, "model_dir": job.steps[0][-1]})
            return {"model_dir": job.steps[0][-1]}
        return {}

    def _results_file(self, job: JobRecord) -> FileRecord:
        """A fine-tuning job's metrics as CSV (step, train_loss, learning_rate, epoch), like OpenAI's result file."""
        file_id = Store.new_id("file")
        path = self.root / "files" / file_id / "step_metrics.csv"
        path.parent.mkdir(parents=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "train_loss", "learning_rate", "epoch"])
            for m in read_metrics(job.run_dir):
                if "loss" in m:
                    writer.writerow([m.get("step"), m["loss"], m.get("learning_rate", ""), m.get("epoch", "")])
        return self.store.add_file(FileRecord(id=file_id, filename=f"{job.id}-step_metrics.csv",
                                              purpose="fine-tune-results", bytes=path.stat().st_size, path=str(path),
                                              image_root=str(path.parent)))

    def _announce(self, name: str, model_dir: Path) -> None:
        for listener in self.on_model:
            try:
                listener(name, model_dir)
            except Exception:  # noqa: BLE001 (a listener's bug must not fail the job)
                logger.exception("studio: a model listener failed for %s", name)

    def fine_tuned_models(self) -> dict[str, Path]:
        """Every succeeded training job's model: name -> directory (merged, or the run), oldest first; directories
        that have been removed are left out."""
        models = {}
        for job in self.store.jobs(("succeeded",), TRAINING_KINDS, newest_first=False):
            name, directory = job.result.get("fine_tuned_model"), job.result.get("model_dir") or job.run_dir
            if name and directory and Path(directory).is_dir():
                models[name] = Path(directory)
        return models

    # ------------------------------------------------------------------ reading a job
    def job_summary(self, job: JobRecord) -> dict:
        """What lists show of a job: id, kind, label, status, progress, last loss, model, times, error."""
        progress = read_progress(job.run_dir) if job.run_dir else {}
        losses = [m["loss"] for m in read_metrics(job.run_dir) if "loss" in m] if job.run_dir else []
        end = job.finished_at or (time.time() if job.started_at else None)
        return {"id": job.id, "kind": job.kind, "label": job.label, "status": job.status,
                "step": f"{progress['step']}/{progress['max_steps']}" if progress.get("max_steps") else "",
                "loss": round(losses[-1], 4) if losses else None,
                "model": job.result.get("fine_tuned_model", ""),
                "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at)),
                "seconds": round(end - job.started_at) if end and job.started_at else None,
                "error": (job.error or "").splitlines()[0] if job.error else ""}

    def log_tail(self, job_id: str, lines: int = 200) -> str:
        """The last lines of a job's log."""
        return "\n".join(tail(self.log_path(job_id), lines))
