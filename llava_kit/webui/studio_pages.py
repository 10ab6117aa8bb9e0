"""The studio's pages in the web UI, beside Chat: Train, Runs and Compare (`llava-kit serve --studio DIR`).

**Train**: start from a recipe, choose the stage, the tower, the LLM and the projector, the data (with a preview of
its first records and the data check's summary), LoRA and DeepSpeed, the steps and rates; Start queues the run as a
studio job, and the page follows it: progress, a loss plot that grows as the run logs, the log's end. **Runs**: every
job, with its log and loss; cancel, resume, merge, export. **Compare**: `llava-kit compare-projectors` as a job, then
its table and plot. A finished training run's model is in the Chat tab's list (as `ft:NAME:JOB`).

Everything the pages show is read from the studio (its database and the jobs' run directories) by timers: a page
holds no state a server restart would lose, and several pages can watch one job.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import anyio
import gradio as gr
import pandas as pd

from llava_kit.compare.runner import LISTED_PROJECTORS
from llava_kit.config import DATA_FORMATS, STAGES, TEMPLATE_NAMES
from llava_kit.errors import LlavaKitError
from llava_kit.schema import load_yaml_file
from llava_kit.studio.files import inspect_data
from llava_kit.studio.recipes import RECIPES, check_data_fits, configs_dir
from llava_kit.studio.runner import read_metrics
from llava_kit.studio.workspace import TRAINING_KINDS, Studio
from llava_kit.webui.train_form import (
    DEEPSPEED,
    FIELDS,
    LLMS,
    STAGE_DEFAULTS,
    VISION_TOWERS,
    config_from_form,
    form_from_config,
    resolve_image_root,
    source_path,
)

TICK_S = 0.5
"""Seconds between the Train page's looks at its run (the Runs and Compare pages look half as often)."""
LOG_LINES = 12
"""Lines of a job's log the pages show (its end: the full log is STUDIO/jobs/ID/log.txt)."""
RUN_COLUMNS = ["id", "kind", "label", "status", "step", "loss", "model", "created", "seconds", "error"]
DEFAULT_RECIPE = "tiny-shapes-pretrain"
COMPARE_CONFIG = "tiny/compare_projectors.yaml"


def studio_tabs(studio: Studio) -> None:
    """Add the Train, Runs and Compare tabs to the gr.Blocks being built."""
    _train_tab(studio)
    _runs_tab(studio)
    _compare_tab(studio)


# ---------------------------------------------------------------------------------------------- Train

def _train_tab(studio: Studio) -> None:
    recipes = [name for name, recipe in RECIPES.items() if (configs_dir() / recipe.config).is_file()]
    start = form_from_config(_recipe_config(DEFAULT_RECIPE)) if DEFAULT_RECIPE in recipes \
        else form_from_config({"stage": "pretrain"})
    with gr.Tab("Train", elem_id="tab-train"):
        with gr.Row():
            recipe = gr.Dropdown(["(none)", *recipes], value=DEFAULT_RECIPE if DEFAULT_RECIPE in recipes else "(none)",
                                 label="Start from recipe", elem_id="train-recipe")
            stage = gr.Dropdown(list(STAGES), value=start["stage"], label="Stage", elem_id="train-stage")
            label = gr.Textbox(start["label"], label="Run name", elem_id="train-label")
        with gr.Row():
            vision = gr.Dropdown(list(VISION_TOWERS), value=start["vision"], allow_custom_value=True,
                                 label="Vision tower (hub id, directory or tiny:vision)", elem_id="train-vision")
            llm = gr.Dropdown(list(LLMS), value=start["llm"], allow_custom_value=True,
                              label="LLM (hub id, directory or tiny:llm)", elem_id="train-llm")
            projector = gr.Dropdown(list(LISTED_PROJECTORS), value=start["projector"], label="Projector",
                                    elem_id="train-projector")
            init_from = gr.Dropdown(_finished_runs(studio), value=start["init_from"], allow_custom_value=True,
                                    label="Projector from a run (model.init_from)", elem_id="train-init-from")
        with gr.Row():
            data_path = gr.Textbox(start["data_path"], label="Data (JSON/JSONL in any format; several: a,b)",
                                   elem_id="train-data", scale=3)
            image_root = gr.Textbox(start["image_root"], label="Image root", elem_id="train-image-root", scale=2)
            data_format = gr.Dropdown(list(DATA_FORMATS), value=start["data_format"], label="Format")
            template = gr.Dropdown(list(TEMPLATE_NAMES), value=start["template"], label="Template")
            max_seq_len = gr.Number(start["max_seq_len"], precision=0, label="max_seq_len")
        preview_button = gr.Button("Preview data", elem_id="train-preview")
        data_summary = gr.Markdown(elem_id="train-data-summary")
        data_preview = gr.Markdown(elem_id="train-data-preview")
        with gr.Accordion("Trainability, LoRA and DeepSpeed", open=False):
            with gr.Row():
                llm_trainable = gr.Dropdown(["frozen", "lora", "qlora", "full"], value=start["llm_trainable"],
                                            label="LLM")
                lora_r = gr.Number(start["lora_r"], precision=0, label="LoRA r")
                lora_alpha = gr.Number(start["lora_alpha"], precision=0, label="LoRA alpha")
                lora_dropout = gr.Number(start["lora_dropout"], label="LoRA dropout")
                deepspeed = gr.Dropdown(list(DEEPSPEED), value=start["deepspeed"], label="DeepSpeed")
        with gr.Accordion("Steps and rates", open=True):
            with gr.Row():
                max_steps = gr.Number(start["max_steps"], precision=0, label="Max steps (-1: epochs decide)",
                                      elem_id="train-max-steps")
                num_epochs = gr.Number(start["num_epochs"], label="Epochs", elem_id="train-epochs")
                micro_batch_size = gr.Number(start["micro_batch_size"], precision=0, label="Micro-batch")
                accumulation = gr.Number(start["gradient_accumulation_steps"], precision=0,
                                         label="Gradient accumulation")
            with gr.Row():
                learning_rate = gr.Number(start["learning_rate"], label="Learning rate")
                projector_lr = gr.Number(start["projector_learning_rate"], label="Projector LR (0: the same)")
                logging_steps = gr.Number(start["logging_steps"], precision=0, label="Log every N steps",
                                          elem_id="train-logging-steps")
                save_steps = gr.Number(start["save_steps"], precision=0, label="Checkpoint every N steps")
                use_cpu = gr.Checkbox(start["use_cpu"], label="Train on the CPU")
        start_button = gr.Button("Start training", variant="primary", elem_id="train-start")
        status = gr.Markdown("No run started from this page yet.", elem_id="train-status")
        plot = gr.LinePlot(_loss_frame([]), x="step", y="loss", title="Training loss", height=280,
                           elem_id="train-loss")
        log = gr.Textbox(label="Log (its end)", lines=LOG_LINES, max_lines=LOG_LINES, elem_id="train-log")
        current = gr.State(None)  # the job started from this page
        shown = gr.State(None)  # what the plot shows (job, points), so an unchanged plot is not sent again

    form = [stage, label, vision, llm, projector, init_from, data_path, image_root, data_format, template, max_seq_len,
            llm_trainable, lora_r, lora_alpha, lora_dropout, deepspeed, max_steps, num_epochs, micro_batch_size,
            accumulation, learning_rate, projector_lr, logging_steps, save_steps, use_cpu]
    assert len(form) == len(FIELDS)

    def fill_from_recipe(name: str):
        if name not in RECIPES:
            return [gr.skip()] * len(form)
        values = form_from_config(_recipe_config(name))
        return [values[field] for field in FIELDS]

    def stage_changed(new_stage: str):
        defaults = STAGE_DEFAULTS[new_stage]
        return defaults["llm_trainable"], defaults["template"]

    async def preview(path: str, root: str, fmt: str, chosen_stage: str):
        if not path.strip():
            return "Give a data file first.", ""
        first = path.split(",")[0].strip()
        try:
            summary = await anyio.to_thread.run_sync(inspect_data, source_path(first),
                                                     resolve_image_root(first, root), fmt)
        except LlavaKitError as err:
            return f"**Data check:** {err}", ""
        verdict = ""
        try:
            check_data_fits(summary.to_dict(), chosen_stage, "the data")
        except LlavaKitError as err:  # readable, but not for this stage
            verdict = f"\n\n**Not for stage {chosen_stage}:** {err}"
        return f"**Data check:** {summary.describe()}{verdict}", _preview_markdown(summary.preview)

    async def start_run(*values):
        form_values = dict(zip(FIELDS, values, strict=True))
        try:
            config = config_from_form(form_values)
            job = await anyio.to_thread.run_sync(
                lambda: studio.submit_train(config, label=(form_values["label"] or "").strip()))
        except LlavaKitError as err:
            return f"**Not started:**\n~~~~text\n{err}\n~~~~", gr.skip()
        return f"Queued **{job.id}** ({job.label}).", job.id

    def follow(job_id: str | None, last):
        if not job_id:
            return gr.skip(), gr.skip(), gr.skip(), last
        job = studio.store.job(job_id)
        metrics = read_metrics(job.run_dir) if job.run_dir else []
        points = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m]
        signature = (job_id, len(points))
        new_plot = _loss_frame(points) if signature != last else gr.skip()
        return _job_line(studio, job), new_plot, studio.log_tail(job_id, LOG_LINES), signature

    recipe.change(fill_from_recipe, recipe, form)
    stage.input(stage_changed, stage, [llm_trainable, template])
    preview_button.click(preview, [data_path, image_root, data_format, stage], [data_summary, data_preview])
    start_button.click(start_run, form, [status, current])
    timer = gr.Timer(TICK_S)
    timer.tick(follow, [current, shown], [status, plot, log, shown], show_progress="hidden", concurrency_limit=None)


def _preview_markdown(preview: list[dict]) -> str:
    """The first records as the page shows them: each in a code block (so `<image>` and markup show as written)."""
    parts = ["**First records**"]
    for record in preview:
        images = f" · images: {', '.join(record['images'])}" if record.get("images") else ""
        if "text" in record:
            body = record["text"]
        else:
            body = "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])
            if "chosen" in record:  # a preference pair: the prompt, then both answers
                body += f"\nassistant (chosen): {record['chosen']}\nassistant (rejected): {record['rejected']}"
        parts.append(f"`{record['source']}`{images}\n~~~~text\n{body.replace('~~~~', '~ ~ ~ ~')}\n~~~~")
    return "\n\n".join(parts)


def _recipe_config(name: str) -> dict:
    return load_yaml_file(configs_dir() / RECIPES[name].config)


def _finished_runs(studio: Studio) -> list[str]:
    return [""] + [job.run_dir for job in studio.store.jobs(("succeeded",), TRAINING_KINDS) if job.run_dir]


def _loss_frame(points: list[tuple[int, float]]) -> pd.DataFrame:
    # typed columns even when empty: the plot takes its axes' kinds (numbers, not categories) from its first value
    return pd.DataFrame({"step": pd.Series([p[0] for p in points], dtype="int64"),
                         "loss": pd.Series([p[1] for p in points], dtype="float64")})


def _job_line(studio: Studio, job) -> str:
    """One line about a job: id, status, step, last loss, its model or why it failed."""
    summary = studio.job_summary(job)
    parts = [f"**{job.id}** ({job.label}): {job.status}"]
    if summary["step"]:
        parts.append(f"step {summary['step']}")
    if summary["loss"] is not None:
        parts.append(f"loss {summary['loss']}")
    if job.status == "succeeded" and summary["model"]:
        parts.append(f"model `{summary['model']}` (in the Chat tab)")
    text = " · ".join(parts)
    if job.status == "failed" and job.error:
        text += "\n\n```\n" + job.error + "\n```"
    return text


# ---------------------------------------------------------------------------------------------- Runs

def _runs_tab(studio: Studio) -> None:
    with gr.Tab("Runs", elem_id="tab-runs"):
        table = gr.Dataframe(_runs_frame(studio), label="Jobs (newest first; click a row to choose it)",
                             interactive=False, wrap=True, elem_id="runs-table")
        with gr.Row():
            chosen = gr.Dropdown(_job_ids(studio), label="Job", allow_custom_value=True, elem_id="runs-job")
            cancel = gr.Button("Cancel", elem_id="runs-cancel")
            resume = gr.Button("Resume", elem_id="runs-resume")
            merge = gr.Button("Merge", elem_id="runs-merge")
            export = gr.Button("Export (hf-llava)", elem_id="runs-export")
        with gr.Row():
            command = gr.Textbox(label="Run a llava-kit command as a job (train, merge, export, compare-projectors, "
                                       "eval, caption)", placeholder="eval --model DIR --data q.jsonl --image-root img",
                                 elem_id="runs-command", scale=5)
            run_command = gr.Button("Run as a job", elem_id="runs-run-command", scale=1)
        details = gr.Markdown(elem_id="runs-details")
        plot = gr.LinePlot(_loss_frame([]), x="step", y="loss", title="Training loss", height=240,
                           elem_id="runs-loss")
        log = gr.Textbox(label="Log (its end)", lines=LOG_LINES, max_lines=LOG_LINES, elem_id="runs-log")
        shown = gr.State(None)

    def refresh(job_id: str | None, last):
        frame = _runs_frame(studio)
        ids = gr.Dropdown(choices=_job_ids(studio))
        if not job_id:
            return frame, ids, "", gr.skip(), "", last
        try:
            job = studio.store.job(job_id)
        except LlavaKitError as err:
            return frame, ids, str(err), gr.skip(), "", last
        points = [(m["step"], m["loss"]) for m in read_metrics(job.run_dir) if "loss" in m] if job.run_dir else []
        signature = (job_id, len(points))
        return (frame, ids, _details(studio, job), _loss_frame(points) if signature != last else gr.skip(),
                studio.log_tail(job_id, LOG_LINES), signature)

    def pick(event: gr.SelectData):
        row = event.row_value if isinstance(event.row_value, list) else None
        return row[0] if row else gr.skip()

    def action(name: str):
        def run(job_id: str | None):
            if not job_id:
                return "Choose a job first."
            try:
                job = getattr(studio, name)(job_id)
            except LlavaKitError as err:
                return f"**{name.capitalize()}:** {err}"
            return f"{name.capitalize()}: {job.id} ({job.kind}) is {job.status}." if name == "cancel" else \
                f"{name.capitalize()}: queued **{job.id}**."
        return run

    async def submit(text: str):
        try:
            job = await anyio.to_thread.run_sync(lambda: studio.submit_command(shlex.split(text)))
        except (LlavaKitError, ValueError) as err:  # ValueError: shlex's unbalanced quotes
            return f"**Not started:**\n~~~~text\n{err}\n~~~~", gr.skip()
        return f"Queued **{job.id}** ({job.kind}).", job.id

    outputs = [table, chosen, details, plot, log, shown]
    run_command.click(submit, command, [details, chosen])
    table.select(pick, None, chosen)
    chosen.change(refresh, [chosen, gr.State(None)], outputs, show_progress="hidden")
    for button, name in ((cancel, "cancel"), (resume, "resume"), (merge, "merge"), (export, "export")):
        button.click(action(name), chosen, details)
    gr.Timer(4 * TICK_S).tick(refresh, [chosen, shown], outputs, show_progress="hidden", concurrency_limit=None)


def _runs_frame(studio: Studio) -> pd.DataFrame:
    rows = [studio.job_summary(job) for job in studio.store.jobs(limit=200)]
    return pd.DataFrame([[row[c] for c in RUN_COLUMNS] for row in rows], columns=RUN_COLUMNS)


def _job_ids(studio: Studio) -> list[str]:
    return [job.id for job in studio.store.jobs(limit=200)]


def _details(studio: Studio, job) -> str:
    lines = [_job_line(studio, job), "", f"kind {job.kind} · " + " → ".join(f"`llava-kit {' '.join(step)}`"
                                                                      for step in job.steps)]
    if job.run_dir:
        lines.append(f"run directory `{job.run_dir}`")
    if job.result.get("model_dir"):
        lines.append(f"model directory `{job.result['model_dir']}`")
    return "  \n".join(lines)


# ---------------------------------------------------------------------------------------------- Compare

def _compare_tab(studio: Studio) -> None:
    default = configs_dir() / COMPARE_CONFIG
    with gr.Tab("Compare", elem_id="tab-compare"):
        gr.Markdown("Train the same recipe with several projectors (`llava-kit compare-projectors`) and compare "
                    "parameters, visual tokens, step time, memory, loss and held-out accuracy. The shipped config "
                    "prepares the shapes task first (tens of minutes on a CPU for every projector).")
        with gr.Row():
            config = gr.Textbox(str(default) if default.is_file() else "", label="Comparison config",
                                elem_id="compare-config", scale=3)
            projectors = gr.Dropdown(list(LISTED_PROJECTORS), value=["linear", "mlp2x_gelu"], multiselect=True,
                                     label="Projectors (empty: the config's list)", elem_id="compare-projectors",
                                     scale=3)
            run = gr.Button("Run comparison", variant="primary", elem_id="compare-run")
        chosen = gr.Dropdown(_compare_ids(studio), label="Comparison job", allow_custom_value=True,
                             elem_id="compare-job")
        shown = gr.State(None)  # the report shown (path, mtime): an unchanged one is not sent again
        status = gr.Markdown(elem_id="compare-status")
        table = gr.Markdown(elem_id="compare-table")
        figure = gr.Image(label="Plot", type="filepath", visible=False, elem_id="compare-plot")

    async def start(path: str, names: list[str]):
        try:
            job = await anyio.to_thread.run_sync(lambda: studio.compare(path.strip(), names or None))
        except LlavaKitError as err:
            return f"**Not started:** {err}", gr.skip()
        return f"Queued **{job.id}**.", gr.Dropdown(choices=_compare_ids(studio), value=job.id)

    def show(job_id: str | None, last):
        hidden = (gr.update(value=""), gr.Image(visible=False))
        if not job_id:
            return gr.skip(), *hidden, None
        try:
            job = studio.store.job(job_id)
        except LlavaKitError as err:
            return str(err), *hidden, None
        line = _job_line(studio, job)
        if job.status == "running":
            line += "\n\n```\n" + studio.log_tail(job_id, 6) + "\n```"
        report = Path(job.steps[0][job.steps[0].index("--report") + 1]) if "--report" in job.steps[0] else None
        if report is None or not report.is_file():
            return line, *hidden, None
        signature = (str(report), report.stat().st_mtime)
        if signature == last:
            return line, gr.skip(), gr.skip(), last
        plot = report.with_suffix(".png")
        figure_update = gr.Image(str(plot), visible=True) if plot.is_file() else gr.Image(visible=False)
        return line, report.read_text(), figure_update, signature

    run.click(start, [config, projectors], [status, chosen])
    chosen.change(show, [chosen, gr.State(None)], [status, table, figure, shown])
    gr.Timer(4 * TICK_S).tick(show, [chosen, shown], [status, table, figure, shown], show_progress="hidden",
                              concurrency_limit=None)


def _compare_ids(studio: Studio) -> list[str]:
    return [job.id for job in studio.store.jobs(kinds=("compare-projectors",))]


__all__ = ["studio_tabs"]
