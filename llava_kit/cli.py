"""The `llava-kit` command: one entry point, subcommand -> function.

Heavy libraries (torch, transformers) are imported inside the functions that need them, so
`llava-kit --help` and `llava-kit caption ...` start fast. Logs and progress go to stderr;
results to stdout or files. User errors (`LlavaKitError`, llava_kit/errors.py) print one clear message (no
traceback) and exit 2; set LLAVA_KIT_DEBUG=1 to see their traceback. Any other exception is a bug and shows its
traceback (exit 1).

Run as the program (`main()` without arguments), the inference commands (chat, eval) start without the cyclic
garbage collector: importing torch and transformers and loading a model create millions of objects that live until
exit, and the collections they trigger took a fifth of the imports' time; the collector resumes once the model is
loaded (`_startup_done`), with everything built so far frozen out of its reach, and again at exit (the interpreter's
teardown otherwise traverses it all: 1-2 s).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from llava_kit.errors import LlavaKitError, PathNotFoundError, UsageError
from llava_kit.scoring import SCORERS


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------- start-up

FAST_START = ("chat", "eval")
"""Commands that call `_startup_done()` once their model is loaded; the collector is paused until then."""


_gc_paused = False  # main() paused the collector for start-up


def _startup_done() -> None:
    """The command's imports and model are in place: freeze what exists (it lives until exit, so collections need not
    traverse it) and resume cyclic garbage collection. A no-op unless main() paused the collector."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


# ---------------------------------------------------------------------------------------------- handlers

MODEL_DIR_HINT = "give a merged model directory (`llava-kit merge`), a run directory (`llava-kit train`) or an " \
                 "imported one (`llava-kit import`)"


def _existing(path: str, what: str, kind: str = "path", hint: str = "") -> str:
    """`path` when it exists (as a file or directory when `kind` says so); PathNotFoundError naming it otherwise."""
    p = Path(path)
    if not p.exists():
        raise PathNotFoundError(f"{what} {path!r} does not exist" + (f"; {hint}" if hint else ""))
    if (kind == "directory" and not p.is_dir()) or (kind == "file" and not p.is_file()):
        raise PathNotFoundError(f"{what} {path!r} is not a {kind}" + (f"; {hint}" if hint else ""))
    return path


def _existing_model(name: str) -> str:
    """`name` when it is a model directory; a `scheme:name` model name (tiny:llm) is resolved first, as the loader
    resolves it (llava_kit/model/sources.py). PathNotFoundError naming it otherwise."""
    from llava_kit.model.sources import resolve_model_path

    _existing(resolve_model_path(name), "--model", "directory", MODEL_DIR_HINT)
    return name


def cmd_train(args: argparse.Namespace) -> int:
    from llava_kit.config import load_config
    from llava_kit.train.engine import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun/deepspeed every rank returns here
        print(run_dir, file=args.results)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from llava_kit.export.merge import merge_run

    _existing(args.run_dir, "RUN_DIR", "directory", "give a run directory written by `llava-kit train`")
    print(merge_run(args.run_dir, args.output, trust_remote_code=args.trust_remote_code), file=args.results)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llava_kit.export.hf_llava import export_model

    _existing(args.model_dir, "MODEL_DIR", "directory", MODEL_DIR_HINT)
    print(export_model(args.model_dir, args.output, args.format, trust_remote_code=args.trust_remote_code),
          file=args.results)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from llava_kit.schema import parse_arguments
    from llava_kit.serve.settings import ServerSettings, parse_models
    from llava_kit.studio.settings import StudioSettings

    settings = parse_arguments(ServerSettings, args, api_key=args.api_key or os.environ.get("LLAVA_KIT_API_KEY"))
    studio_settings = parse_arguments(StudioSettings, args)
    if not args.model and not studio_settings.studio:
        raise UsageError("give the model(s) to serve (--model DIR), or --studio [DIR] to train models and serve them")
    models = parse_models(args.model, settings.model_name) if args.model else []
    for _, path in models:
        _existing_model(path)
    mount_webui = None
    if settings.webui:
        try:
            from llava_kit.webui import mount_webui
        except ImportError as err:
            logging.getLogger(__name__).warning("the web UI is off: %s; install it with pip install "
                                                "'llava-kit[webui]' (or pass --no-webui)", err)
    from llava_kit.serve.server import serve

    studio, routers = None, []
    if studio_settings.studio:
        from llava_kit.studio import Studio
        from llava_kit.studio.api import studio_router

        studio = Studio(studio_settings.studio).start(studio_settings.max_jobs)
        routers.append(studio_router(studio, studio_settings))
        logging.getLogger(__name__).info("studio %s: running up to %d job(s) at once", studio.root,
                                         studio_settings.max_jobs)

    def setup(app) -> None:
        if studio is not None:
            from llava_kit.studio.models import serve_fine_tuned_models

            serve_fine_tuned_models(studio, app.state.workers, settings)
        if mount_webui is not None:
            mount_webui(app, studio)

    try:
        serve(models, settings, trust_remote_code=args.trust_remote_code, setup=setup, routers=routers)
    finally:
        if studio is not None:
            studio.close()  # its running jobs go on; the next `serve --studio` re-attaches to them
    return 0


def cmd_webui(args: argparse.Namespace) -> int:
    from llava_kit.schema import parse_arguments
    from llava_kit.serve.settings import ServerSettings, parse_models

    settings = parse_arguments(ServerSettings, args)
    models = parse_models(args.model)
    for _, path in models:
        _existing_model(path)
    try:
        from llava_kit.webui import mount_webui
    except ImportError as err:
        raise UsageError(f"the web chat needs gradio ({err}); install it with pip install 'llava-kit[webui]'") \
            from None
    from llava_kit.serve.server import serve

    serve(models, settings, trust_remote_code=args.trust_remote_code, setup=mount_webui, openai_api=False)
    return 0


def _open_studio(path: str):
    from llava_kit.studio import Studio

    if not (Path(path).expanduser() / "studio.db").is_file():
        raise PathNotFoundError(f"no studio in {path!r}; `llava-kit serve --studio {path}` makes one (give "
                                "--studio DIR for another folder)")
    return Studio(path)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    studio = _open_studio(args.studio)
    jobs = studio.store.jobs(tuple(args.status) or None, limit=None if args.all else 20)
    columns = ("id", "kind", "status", "step", "loss", "label", "model", "created")
    rows = [[str(summary[c] if summary[c] is not None else "") for c in columns]
            for summary in map(studio.job_summary, jobs)]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    for row in [list(columns), *rows]:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip(),
              file=args.results)
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    studio = _open_studio(args.studio)
    job = studio.store.job(args.job_id)
    summary = studio.job_summary(job)
    out = args.results
    for key in ("id", "kind", "label", "status", "step", "loss", "model", "created", "seconds"):
        if summary[key] not in (None, ""):
            print(f"{key}: {summary[key]}", file=out)
    for i, step in enumerate(job.steps):
        print(f"step {i + 1}: llava-kit {' '.join(step)}", file=out)
    if job.run_dir:
        print(f"run_dir: {job.run_dir}", file=out)
    if job.result.get("model_dir"):
        print(f"model_dir: {job.result['model_dir']}", file=out)
    if job.error:
        print(f"error: {job.error}", file=out)
    print("events:", file=out)
    for event in studio.store.events(job.id, limit=args.events)[::-1]:
        when = time.strftime("%H:%M:%S", time.localtime(event.created_at))
        print(f"  {when} {event.level:5} {event.message}", file=out)
    if args.log:
        print(f"log ({studio.log_path(job.id)}, its last {args.log} lines):", file=out)
        print(studio.log_tail(job.id, args.log), file=out)
    return 0


def cmd_jobs_submit(args: argparse.Namespace) -> int:
    studio = _open_studio(args.studio)
    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    job = studio.submit_command(command, label=args.label or "")
    print(job.id, file=args.results)
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    from llava_kit.studio.runner import cancel_job

    studio = _open_studio(args.studio)
    job = cancel_job(studio.store, args.job_id, grace_s=args.grace)
    print(f"{job.id}: {job.status}", file=args.results)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from llava_kit.export.import_llava import import_checkpoint

    _existing(args.checkpoint, "CHECKPOINT", "directory", "give a llava-hf or original LLaVA checkpoint directory")
    if args.vision:
        _existing(args.vision, "--vision", "directory", "give a local copy of the checkpoint's mm_vision_tower")
    print(import_checkpoint(args.checkpoint, args.output, args.vision), file=args.results)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from llava_kit.inference import ChatSession, SamplingParams, answer_once
    from llava_kit.loader import open_model_dir
    from llava_kit.serve.chat import run_repl

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)  # checked before the model loads
    _existing_model(args.model)
    if args.image:
        _existing(args.image, "--image", "file")
    session = ChatSession.from_loaded(open_model_dir(args.model, trust_remote_code=args.trust_remote_code), params)
    _startup_done()
    if args.prompt is not None:
        print(answer_once(session, args.image, args.prompt), file=args.results)
        return 0
    run_repl(session, args.image, stdout=args.results)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.model is None and args.base_url is None:
        raise UsageError("give the model to score: --model DIR (any model directory) or --base-url URL (an "
                         "OpenAI-compatible endpoint, e.g. `llava-kit serve`)")
    if args.model is not None:
        _existing_model(args.model)
    _existing(args.data, "--data", hint="give the benchmark's local file (or folder)")
    if args.image_root is not None:
        _existing(args.image_root, "--image-root", "directory", "give the directory the image files are in")
    for option, value, least in (("--limit", args.limit, 0), ("--batch-size", args.batch_size, 1),
                                 ("--concurrency", args.concurrency, 1)):
        if value < least:
            raise UsageError(f"{option} {value}: must be at least {least}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.scorer != "auto" and args.benchmark != "custom":
        raise UsageError(f"--scorer applies to the custom JSONL; benchmark {args.benchmark!r} scores as it defines")
    from llava_kit.eval import format_summary, run_benchmark

    service = None
    if args.model is not None:
        from llava_kit.inference import GenerationService
        from llava_kit.loader import open_model_dir

        service = GenerationService.from_loaded(open_model_dir(args.model, trust_remote_code=args.trust_remote_code))
    _startup_done()
    result = run_benchmark(args.benchmark, args.data, args.image_root, service=service, base_url=args.base_url,
                           model_name=args.model_name, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
                           limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           concurrency=args.concurrency, predictions_path=args.predictions, scorer=args.scorer)
    print(format_summary(result), file=args.results)
    return 0


def cmd_init_tiny(args: argparse.Namespace) -> int:
    from llava_kit.testing.tiny import init_tiny

    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise UsageError(f"OUT_DIR {args.out_dir!r} is a file; give a directory (new or existing) for vision/ and llm/")
    paths = init_tiny(args.out_dir, seed=args.seed)
    print(f"vision: {paths['vision']}\nllm: {paths['llm']}", file=args.results)
    return 0


OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")


def _files_and_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Split `data check`'s positional arguments into data files and `key=value` config overrides."""
    overrides = [i for i in items if OVERRIDE.match(i) and not Path(i).exists()]
    return [i for i in items if i not in overrides], overrides


def cmd_data_check(args: argparse.Namespace) -> int:
    from llava_kit.data.check import check_records

    files, overrides = _files_and_overrides(args.data)
    if overrides and not args.config:
        raise UsageError(f"{overrides[0]}: key=value overrides change a training config; give --config CONFIG")
    if not files and not args.config:
        raise UsageError("give the data file(s) to check, or --config CONFIG to check its data")
    cfg = None
    if args.config:
        from llava_kit.config import load_config

        # FILE, --format and --image-root become overrides, so the config's own checks see them (formats per stage)
        given = [f"data.path={json.dumps(files)}", "data.datasets=[]"] if files else []
        given += [f"data.format={args.format}"] if args.format else []
        given += [f"data.image_root={json.dumps(args.image_root)}"] if args.image_root else []
        cfg = load_config(args.config, ["output_dir=unused", *overrides, *given])  # a check writes nothing
    fmt = args.format or (cfg.data.format if cfg else "auto")
    from llava_kit.config import PREFERENCE_FORMATS, PREFERENCE_STAGES

    if cfg is not None and cfg.stage in PREFERENCE_STAGES:  # pairs, encoded as dpo / text-dpo train on them
        report = _check_pairs(cfg)
    elif cfg is None and fmt in PREFERENCE_FORMATS:
        from llava_kit.data.check import check_pairs

        report = check_pairs(files, fmt, "dpo", args.image_root)
    elif (cfg is not None and cfg.modality == "text") or (cfg is None and fmt == "text"):
        report = _check_text(cfg, files, fmt)
    elif cfg is not None:
        from llava_kit.data.multimodal import encode_settings
        from llava_kit.model.build import build_llava

        model, tokenizer = build_llava(cfg.model)
        report = check_records(cfg.data.path, cfg.data.format, cfg.stage, cfg.data.image_root,
                               encode_settings(cfg, model, tokenizer))
    else:
        report = check_records(files, fmt, None, args.image_root)
    _print_check(report, cfg, args.results)
    return 0 if not report.skipped else 1


def _check_pairs(cfg):
    from llava_kit.data.check import check_pairs
    from llava_kit.data.encode import EncodeSettings

    d = cfg.data
    if cfg.modality == "text":
        from llava_kit.model.build import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.llm.tokenizer or cfg.model.llm.name_or_path, cfg.model.llm.trust_remote_code)
        settings = EncodeSettings(tokenizer, d.template, d.max_seq_len, d.overlong, d.system_prompt)
    else:
        from llava_kit.model.build import build_llava

        model, tokenizer = build_llava(cfg.model)
        settings = EncodeSettings(tokenizer, d.template, d.max_seq_len, d.overlong, d.system_prompt,
                                  model.image_token_id, model.tokens_per_image)
    return check_pairs(d.path, d.format, cfg.stage, d.image_root if cfg.modality != "text" else "", settings)


def _check_text(cfg, files: list[str], fmt: str):
    from llava_kit.config import DataConfig
    from llava_kit.data.check import check_text_records

    if cfg is None:
        stage, data, tokenizer = ("text-pt" if fmt == "text" else "text-sft"), DataConfig(), None
        data.format = "auto" if fmt == "text" else fmt
    else:
        from llava_kit.model.build import load_tokenizer

        stage, data = cfg.stage, cfg.data
        tokenizer = load_tokenizer(cfg.model.llm.tokenizer or cfg.model.llm.name_or_path,
                                   cfg.model.llm.trust_remote_code)
    return check_text_records(files or None, data, stage, tokenizer)


def _print_check(report, cfg, out) -> None:
    """Every bad record (source, id, reason), the token lengths, whether training would stop, `valid: N invalid: M`."""
    from llava_kit.data.dataset import OverlongError, check_lengths

    report.log()
    for record in report.skipped:
        print(f"{record.source}\t{record.id or '-'}\t{record.reason}", file=out)
    lengths = report.length_summary()
    if lengths:
        fit = (f"; {lengths['fit_max_seq_len']:.1%} fit data.max_seq_len {report.max_seq_len} "
               f"(data.overlong: {report.overlong})") if "fit_max_seq_len" in lengths else ""
        print(f"tokens per record: p50 {lengths['p50']}, p90 {lengths['p90']}, p99 {lengths['p99']}, "
              f"max {lengths['max']}{fit}", file=out)
    if cfg is not None:
        try:
            check_lengths(report, cfg.data.min_kept_fraction)
        except OverlongError as err:
            print(f"training would stop: {err}", file=out)
    print(f"valid: {report.kept} invalid: {len(report.skipped)}", file=out)


def cmd_data_convert(args: argparse.Namespace) -> int:
    from llava_kit.data.convert import convert

    written, bad, _ = convert(args.data, args.output, args.to, args.format, args.dataset_info)
    for record in bad:
        print(f"{record.source}\t{record.id or '-'}\t{record.reason}", file=args.results)
    print(f"converted: {written} skipped: {len(bad)} -> {args.output}", file=args.results)
    return 0 if not bad else 1


def cmd_projectors(args: argparse.Namespace) -> int:
    from llava_kit.compare import format_listing, list_projectors, parse_grid

    rows = list_projectors(args.vision_width, args.llm_width, parse_grid(args.grid), has_cls=args.has_cls)
    print(format_listing(rows), file=args.results)
    return 0


def cmd_compare_projectors(args: argparse.Namespace) -> int:
    from llava_kit.compare import compare_projectors
    from llava_kit.compare.report import format_results

    names = [n.strip() for n in args.projectors.split(",") if n.strip()] if args.projectors else None
    results, report = compare_projectors(args.config, names, args.report)
    print(format_results(results), file=args.results)
    print(f"report: {report}", file=args.results)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.preference and args.task != "shapes":
        raise UsageError("--preference runs its own recipe on the shapes task; drop --task")
    if args.preference:
        from llava_kit.demo.preference import run_preference_demo

        return run_preference_demo(args.workdir or "demo_preference", quick=args.quick, results=args.results)
    from llava_kit.demo import run_demo

    return run_demo(args.workdir or "demo_workdir", quick=args.quick, results=args.results, task=args.task)


# ---------------------------------------------------------------------------------------------- parser


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold when temperature > 0")
    p.add_argument("--seed", type=int, help="seed of the sampling draws (same seed, same answer)")


def _add_trust_remote_code(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model directory's own Python code to run (needed by some LLMs, e.g. InternLM2; "
                        "only for directories you trust)")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every subcommand (cheap: no torch import)."""
    from llava_kit.config import BENCHMARK_NAMES, DATA_FORMATS, WRITABLE_FORMATS
    from llava_kit.schema import add_arguments
    from llava_kit.serve.settings import CLI_FIELDS as SERVE_FIELDS
    from llava_kit.serve.settings import WEBUI_FIELDS, WEBUI_PORT, ServerSettings
    from llava_kit.studio.settings import SERVE_FIELDS as STUDIO_FIELDS
    from llava_kit.studio.settings import StudioSettings, default_studio_dir
    from llava_kit.studio.store import STATUSES

    parser = argparse.ArgumentParser(
        prog="llava-kit",
        description="Build LLaVA-style vision-language models: caption data, pretrain a projector, "
                    "LoRA SFT, merge, chat. Logs go to stderr, results to stdout.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="offline end-to-end run on synthetic shapes (pretrain -> sft -> merge -> eval)",
                       description="Generate the synthetic shapes data, build tiny models, train, merge and score "
                                   "held-out questions. Ends with `accuracy: X.XX`; leaves WORKDIR/merged for chat.")
    p.add_argument("--workdir", default=None, help="where data, runs and the merged model go "
                                                   "(default ./demo_workdir)")
    p.add_argument("--quick", action="store_true", help="a few steps only, to check the pipeline (accuracy is low)")
    p.add_argument("--task", default="shapes", choices=["shapes", "wide", "small"],
                   help="shapes (default); wide: shapes on 2:1 to 3:1 canvases read at any resolution (AnyRes "
                        "tiles); small: shapes 6-10%% of a large canvas, too small for the fixed strategy's squash, "
                        "read by AnyRes (docs/high-resolution.md)")
    p.add_argument("--preference", action="store_true",
                   help="the preference recipe instead: an sft that names absent shapes, then dpo; prints how often "
                        "answers name an absent shape before and after (docs/preference.md; default workdir "
                        "./demo_preference)")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("init-tiny", help="write tiny random models: OUT_DIR/vision and OUT_DIR/llm",
                       description="Write a tiny random CLIP vision model (+ image processor) and a tiny random "
                                   "Llama (+ locally trained BPE tokenizer with a chat template), saved like real "
                                   "checkpoints.")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.set_defaults(handler=cmd_init_tiny)

    p = sub.add_parser("train", help="train any stage from a YAML config",
                       description="Train a stage (pretrain, sft, text-pt, text-sft) from CONFIG.yaml; `key=value` arguments override "
                                   "config keys (e.g. output_dir=runs/x train.max_steps=100 model.lora.r=16).")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of config keys, dotted for nesting")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in output_dir (its weights, checkpoints, metrics); without it such "
                        "a directory is refused unless the config resumes it (train.resume_from_checkpoint)")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("merge", help="fold projector and LoRA into one standalone model directory",
                       description="Load RUN_DIR (base models from its config + trained weights), merge LoRA into "
                                   "the LLM and write a directory that needs no base model paths.")
    p.add_argument("run_dir", help="a run directory written by `llava-kit train`")
    p.add_argument("-o", "--output", required=True, help="output directory of the merged model")
    _add_trust_remote_code(p)
    p.set_defaults(handler=cmd_merge)

    p = sub.add_parser("export", help="write a model in another format (hf-llava: transformers, vLLM, SGLang)",
                       description="Export a merged model or run directory to transformers' llava format: "
                                   "LlavaForConditionalGeneration + AutoProcessor (image processor, tokenizer, chat "
                                   "template) load OUT_DIR without llava-kit. Projectors the format cannot express "
                                   "are refused with the reason.")
    p.add_argument("model_dir", help="a merged model directory or a run directory")
    p.add_argument("--format", default="hf-llava", choices=["hf-llava", "hf-llava-next"],
                   help="output format (default hf-llava; hf-llava-next for AnyRes models: LlavaNextForConditionalGeneration)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    _add_trust_remote_code(p)
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("import", help="convert a llava-hf or original LLaVA checkpoint into a llava-kit model dir",
                       description="Read a llava-hf directory (config.json model_type 'llava') or an original LLaVA "
                                   "checkpoint (mm_projector weights) and write a merged llava-kit directory: "
                                   "--model for chat/serve/export, and the start of an sft run (vision=OUT/vision, "
                                   "llm=OUT/llm, init_from=OUT).")
    p.add_argument("checkpoint", help="the checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--vision", help="original LLaVA only: a local copy of the config's mm_vision_tower")
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("chat", help="chat about an image, or with a text model (interactive, or one-shot with --prompt)",
                       description="Interactive multi-turn chat with streamed answers (commands: /image PATH, "
                                   "/reset, /help, /exit). With --prompt: print only the answer on stdout and exit.")
    p.add_argument("--model", required=True, help="a merged model directory or a run directory")
    p.add_argument("--image", help="image file to talk about (leave out for a text model: a merged text-pt/text-sft run)")
    p.add_argument("--prompt", help="one-shot question: print only the answer and exit")
    _add_generation_options(p)
    _add_trust_remote_code(p)
    p.set_defaults(handler=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible server (/v1/chat/completions, /v1/models) and web chat at /",
                       description="Serve one or more merged model or run directories like the OpenAI API: text and "
                                   "image_url parts (data URLs), streaming (SSE) or not; greedy by default, so "
                                   "answers equal `llava-kit chat --prompt`. Concurrent requests are queued and "
                                   "batched. The web chat is at / (--no-webui: the API alone). Ctrl-C stops it.")
    p.add_argument("--model", action="append", metavar="[NAME=]DIR",
                   help="a merged model directory or a run directory; repeat for several models, each named by its "
                        "directory or NAME= (requests choose one by `model`); optional with --studio")
    add_arguments(p, ServerSettings, SERVE_FIELDS, options={"webui": {
        "flags": ("--no-webui",), "action": "store_false", "type": None, "choices": None,
        "help": "serve the API alone, without the web UI at /"}})
    add_arguments(p, StudioSettings, STUDIO_FIELDS, options={"studio": {
        "nargs": "?", "const": default_studio_dir(), "metavar": "DIR"}})
    _add_trust_remote_code(p)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("jobs", help="the training studio's jobs: list, show, cancel (`serve --studio` runs them)",
                       description="Jobs of a training studio (a folder: `llava-kit serve --studio DIR` runs its "
                                   "queue; the web UI's Train page and the fine-tuning API add to it).")
    jobs_sub = p.add_subparsers(dest="jobs_command", metavar="JOBS_COMMAND")

    def jobs_parser(name: str, help_text: str, handler, with_id: bool = True) -> argparse.ArgumentParser:
        j = jobs_sub.add_parser(name, help=help_text, description=help_text)
        if with_id:
            j.add_argument("job_id", help="a job id (`llava-kit jobs list`)")
        j.add_argument("--studio", default=default_studio_dir(),
                       help="the studio folder (default: %(default)s)")
        j.set_defaults(handler=handler)
        return j

    j = jobs_parser("list", "list the jobs, newest first: id, kind, status, step, loss, model", cmd_jobs_list,
                    with_id=False)
    j.add_argument("--status", action="append", default=[], choices=STATUSES, help="only jobs in this status "
                                                                                   "(repeatable)")
    j.add_argument("--all", action="store_true", help="every job (default: the newest 20)")
    j = jobs_parser("show", "a job's details, its events and the end of its log", cmd_jobs_show)
    j.add_argument("--events", type=int, default=20, help="how many of its latest events (default 20)")
    j.add_argument("--log", type=int, default=20, help="how many of its log's last lines (default 20; 0: none)")
    j = jobs_parser("submit", "queue a llava-kit command as a job (train, merge, export, compare-projectors, eval, "
                              "caption); it runs in this folder once a `serve --studio` runs the queue; prints its id",
                    cmd_jobs_submit, with_id=False)
    j.add_argument("--label", help="what lists call it (default: the command, or a train run's directory name)")
    j.add_argument("job_command", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help="the llava-kit command and its arguments, e.g. eval --model m --data q.jsonl --image-root img")
    j = jobs_parser("cancel", "cancel a queued or running job (SIGTERM to its processes, SIGKILL after --grace)",
                    cmd_jobs_cancel)
    j.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default 10)")

    p = sub.add_parser("webui", help="web chat in a browser: images, streamed answers, two models side by side",
                       description="A Gradio chat page for one or more models: upload images, ask, read the "
                                   "answer as it is generated; sampling controls, regenerate, clear, and a "
                                   "side-by-side tab sending the same turn to two models. `llava-kit serve` "
                                   "serves the same page at / next to the API.")
    p.add_argument("--model", required=True, action="append", metavar="[NAME=]DIR",
                   help="a merged model directory or a run directory; repeat for several (side by side)")
    add_arguments(p, ServerSettings, WEBUI_FIELDS, options={"port": {"default": WEBUI_PORT}})
    _add_trust_remote_code(p)
    p.set_defaults(handler=cmd_webui)

    p = sub.add_parser("eval", help="score a model on a benchmark (MMBench, MME, POPE, ScienceQA-IMG, VQA, or a JSONL)",
                       description="Answer a benchmark's questions, read from its standard local files, with "
                                   "LLaVA-1.5's prompts, through any model directory (--model) or any "
                                   "OpenAI-compatible endpoint (--base-url), and print its metrics per category, "
                                   "the headline metric last (the custom JSONL: `accuracy: X.XX`). docs/evaluation.md "
                                   "lists the files each benchmark reads.")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", help="a model directory: run (LoRA not merged), merged, hf-llava export, ...")
    model.add_argument("--base-url", help="an OpenAI-compatible endpoint instead, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--benchmark", default="custom", choices=BENCHMARK_NAMES,
                   help="the benchmark and so the file format (default custom: llava-kit's eval JSONL)")
    p.add_argument("--data", required=True,
                   help="the benchmark's local file or folder (custom: JSONL {image, question, answer | "
                        "kind+shape+color})")
    p.add_argument("--image-root", help="directory the image file names are relative to (not needed where the file "
                                        "holds its images: MMBench's TSV, parquet files, MME's release folder)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N questions (0 = all; MMBench: "
                                                        "circular groups; MME: images)")
    p.add_argument("--predictions", help="write every prompt with its prediction and score to this JSONL")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default: 32 for custom, 16 for the "
                                                      "others)")
    p.add_argument("--batch-size", type=int, default=32, help="--model: questions decoded together (default 32)")
    p.add_argument("--concurrency", type=int, default=8, help="--base-url: requests in flight (default 8)")
    p.add_argument("--model-name", help="--base-url: the model to ask (default: the first GET /models lists)")
    p.add_argument("--api-key", help="--base-url: its API key (default $OPENAI_API_KEY; any placeholder for a server "
                                     "without one)")
    p.add_argument("--scorer", default="auto", choices=["auto", *SCORERS],
                   help="custom only: how answers are scored: exact (`answer` field), shapes (the shapes task's "
                        "fields), or auto (the first that fits every record; default)")
    _add_trust_remote_code(p)
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("projectors", help="list every projector with its visual-token and parameter count",
                       description="For a vision width, patch grid and LLM width, list each projector's visual "
                                   "tokens per image and parameters (or why it refuses that grid).")
    p.add_argument("--vision-width", type=int, default=1024, help="vision feature width C (default 1024, CLIP-L)")
    p.add_argument("--grid", default="24", help="patch grid: a side (24) or ROWSxCOLS (27x27) (default 24)")
    p.add_argument("--llm-width", type=int, default=4096, help="LLM hidden width d (default 4096, 7B)")
    p.add_argument("--has-cls", action="store_true", help="the features keep a leading CLS token")
    p.set_defaults(handler=cmd_projectors)

    p = sub.add_parser("compare-projectors", help="train and score several projectors with the same recipe",
                       description="Run the same pretrain + sft recipe (data, steps, seed) for each projector, score "
                                   "held-out questions, and write a table (markdown + CSV) and a plot.")
    p.add_argument("config", help="comparison YAML (see configs/tiny/compare_projectors.yaml)")
    p.add_argument("--projectors", help="comma-separated projector names (default: the config's list)")
    p.add_argument("--report", help="markdown report path; CSV and PNG go beside it (default "
                                    "OUTPUT_DIR/comparison.md)")
    p.set_defaults(handler=cmd_compare_projectors)

    p = sub.add_parser("data", help="data tools (`llava-kit data check`, `llava-kit data convert`)")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    c = data_sub.add_parser("check", help="list bad records with reasons; ends with `valid: N invalid: M`",
                            description="Pre-flight check of training data in any format the readers take (LLaVA, "
                                        "ShareGPT, OpenAI, Alpaca, MOSS, text, LLaMA-Factory dataset_info.json#NAME): "
                                        "broken lines, roles, empty answers, <image> counts, missing, unreadable "
                                        "(decoded whole) or escaping images. With --config, that stage's own steps: "
                                        "its tokenizer and template, over-long records under data.overlong, token "
                                        "length percentiles, and whether training would stop. Exit code 1 when any "
                                        "record is bad.")
    c.add_argument("data", nargs="*", metavar="FILE_OR_KEY=VALUE",
                   help="data file(s) to check (default: the --config's data), and key=value overrides of --config "
                        "(e.g. data.max_seq_len=512)")
    c.add_argument("--image-root", help="directory the records' image paths are relative to")
    c.add_argument("--format", choices=DATA_FORMATS,
                   help="record format (default: auto, detected per file; or the --config's data.format); `text` is "
                        "raw text for text-pt")
    c.add_argument("--config", help="a training config: check as that stage trains (tokenizer, template, "
                                    "max_seq_len, over-long policy)")
    c.set_defaults(handler=cmd_data_check)
    c = data_sub.add_parser("convert", help="convert data between formats (llava, sharegpt, openai)",
                            description="Read data in any format the readers take and write it as LLaVA JSON, "
                                        "LLaMA-Factory's ShareGPT or OpenAI messages (.json: one array, .jsonl: one "
                                        "record per line). Records that cannot be read or written in the target "
                                        "format are listed with their reason (exit code 1).")
    c.add_argument("data", nargs="+", help="input file(s), or a LLaMA-Factory entry DIR/dataset_info.json#NAME")
    c.add_argument("-o", "--output", required=True, help="output .json or .jsonl file")
    c.add_argument("--to", required=True, choices=WRITABLE_FORMATS, help="output format")
    c.add_argument("--format", default="auto", choices=[f for f in DATA_FORMATS if f != "text"],
                   help="input record format (default auto: detected per file)")
    c.add_argument("--dataset-info", action="store_true",
                   help="also add an entry for OUTPUT to the dataset_info.json beside it (LLaMA-Factory; --to sharegpt)")
    c.set_defaults(handler=cmd_data_convert)

    from data_gen.cli import add_caption_arguments  # torch-free

    p = sub.add_parser("caption", help="turn an image folder into LLaVA training data through a vision API",
                       description="Caption every image under IMAGE_DIR with an OpenAI-compatible vision chat API "
                                   "into LLaVA JSONL; resumable, rate-limited, validated.")
    add_caption_arguments(p)
    p.set_defaults(handler=_run_caption)
    return parser


def _run_caption(args: argparse.Namespace) -> int:
    from data_gen.cli import run_caption

    return run_caption(args)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the chosen subcommand; returns the process exit code.

    With `argv` None (the program: `llava-kit ...`, `python -m llava_kit.cli ...`) it also manages the garbage
    collector around start-up and exit (see the module docstring); called with arguments (tests, scripts) it leaves
    the collector alone.
    """
    global _gc_paused
    owns_process = argv is None and gc.isenabled()
    if owns_process:
        gc.disable()
        _gc_paused = True
    try:
        return _run(argv)
    finally:
        if owns_process:
            _startup_done()  # a command outside FAST_START, or one that failed before its model loaded
            gc.freeze()  # exit: the interpreter's teardown need not traverse what the command built


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train CONFIG --overwrite key=value`: argparse leaves overrides written after an option unparsed
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra and getattr(args, "data_command", None) == "check" and not any(e.startswith("-") for e in extra):
        args.data += extra  # `data check FILE --config CFG key=value`: files and overrides after the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    args.results = sys.stdout
    if args.command not in FAST_START:
        _startup_done()
    if args.command != "caption":
        setup_logging(args.verbose)
    try:
        if args.command == "caption":  # torch-free; manages its own output
            return int(args.handler(args) or 0)
        # Libraries print notices on import and during training (DeepSpeed, the Trainer's log dicts); only
        # results belong on stdout, so everything printed goes to stderr and handlers write to args.results.
        with contextlib.redirect_stdout(sys.stderr):
            return int(args.handler(args) or 0)
    except LlavaKitError as err:  # anything else is a bug: its traceback shows (exit 1)
        if os.environ.get("LLAVA_KIT_DEBUG"):
            raise
        command = " ".join(filter(None, (args.command, getattr(args, "data_command", None),
                                         getattr(args, "jobs_command", None))))
        print(f"llava-kit {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
