"""The options of `llava-kit caption`, as one typed model: documentation, defaults, choices, bounds and cross-checks.

    options, problems = CaptionOptions.from_arguments(args)    # args: parsed by add_caption_arguments

`data_gen/cli.py` derives the command-line options from these fields (help from the docstrings) and builds the
pipeline's own option objects (`RunOptions`, `ClientOptions`, `BatchOptions`) from a checked `CaptionOptions`.
Imports nothing heavy: `llava-kit caption --help` must start fast and data_gen never imports torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from data_gen.client import RESPONSE_FORMATS
from data_gen.prompts import TASKS
from llava_kit.schema import Schema, check_data

if TYPE_CHECKING:
    from data_gen.batch import BatchOptions
    from data_gen.client import ClientOptions
    from data_gen.preference import SamplerOptions
    from data_gen.run import RunOptions

DETAILS = ("low", "high", "auto")  # same as data_gen.images.DETAILS, without importing PIL for --help
EXPORT_FORMATS = ("llava-json", "sharegpt")  # same as data_gen.export.EXPORT_FORMATS


class CaptionOptions(Schema):
    """Everything `llava-kit caption` is told; each field is one command-line option."""

    image_dir: Path
    """folder scanned recursively for jpg/jpeg/png/webp/gif/bmp images"""
    output: Path
    """LLaVA JSONL dataset to create or extend; failures go to OUT.errors.jsonl"""
    model: str | None = None
    """model name as the API knows it, e.g. gpt-4o-mini (required unless --export-only)"""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: api.openai.com)"""
    api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the API key"""

    task: Literal[tuple(TASKS)] = "caption"
    """caption: brief (pretraining); detail: detailed description; conversation: several QA turns; reasoning: one
    complex-reasoning QA; preference: DPO pairs, answers drawn from --sampler-base-url judged by --model"""
    prompt_file: Path | None = None
    """text file replacing the task's instruction to the model (the JSON answer format is still appended); with
    --task preference, the questions asked of the sampled model, one per line; results are kept apart from the
    default prompt's"""
    raw_prompt: bool = False
    """send the --prompt-file text alone, without the rules and the JSON answer format, and read the answer as plain
    text (small local models trained on short questions, e.g. `llava-kit serve`)"""
    seed: int = 0
    """seed for the per-image choice of the stored question"""
    detail: Literal[DETAILS] = "auto"
    """image detail sent to the API; images are downscaled to match before upload"""
    response_format: Literal[RESPONSE_FORMATS] = "auto"
    """auto tries json_schema, falls back to json_object, then to text parsing"""
    max_tokens: int | None = Field(None, ge=0)
    """completion token limit per request (default: per task; 0: do not send one)"""
    temperature: float | None = None
    """sampling temperature (default: the server's)"""
    limit: int | None = Field(None, ge=0)
    """caption at most N of the images not yet done"""

    sampler_base_url: str | None = None
    """--task preference: the OpenAI-compatible endpoint of the model whose answers are judged, e.g. `llava-kit
    serve`'s http://127.0.0.1:8000/v1"""
    sampler_model: str | None = None
    """--task preference: the model name at --sampler-base-url"""
    sampler_api_key_env: str = "SAMPLER_API_KEY"
    """--task preference: environment variable holding the sampler's key (unset: the placeholder EMPTY)"""
    samples: int = Field(4, ge=2, le=16)
    """--task preference: answers drawn per image; the judge picks the best and the worst of the distinct ones"""
    sampler_temperature: float = Field(1.0, ge=0)
    """--task preference: sampling temperature of the drawn answers (high enough that they differ)"""
    sampler_max_tokens: int = Field(256, ge=1)
    """--task preference: completion budget of one drawn answer"""

    concurrency: int = Field(8, ge=1)
    """requests in flight at once"""
    rpm: float | None = Field(None, gt=0)
    """at most N requests per minute (default: no limit)"""
    timeout: float = Field(120.0, gt=0)
    """seconds allowed for one request"""
    max_retries: int = Field(6, ge=0)
    """retries per image after 429, 5xx, timeouts, dropped connections"""
    validation_retries: int = Field(2, ge=0)
    """retries per image after a refusal or an empty, truncated, malformed or source-leaking answer"""
    retry_delay: float = Field(1.0, ge=0)
    """first backoff when the server sends no Retry-After; doubles per retry, jittered"""
    no_progress: bool = False
    """no progress bar on stderr"""

    dry_run: bool = False
    """count images and estimate tokens and cost; send nothing, write nothing"""
    price: str | None = None
    """USD per 1M input and output tokens for --model, overriding the built-in table"""
    price_table: Path | None = None
    """JSON {"model": {"input": USD, "output": USD, "image_multiplier": 1.0}} merged over the built-in price table"""

    batch: bool = False
    """send through the Batch API (half price, results within 24 h); rerun with --batch after a crash to collect
    submitted batches without paying again"""
    batch_max_requests: int = Field(50_000, ge=1)
    """requests per batch file (the API's limit by default)"""
    batch_max_bytes: int = Field(200_000_000, ge=1024)
    """bytes per batch file (the API's limit by default)"""
    poll_interval: float = Field(30.0, gt=0)
    """seconds between batch status checks"""

    export: list[Literal[EXPORT_FORMATS]] = Field(default_factory=list)
    """after the run, also write OUT.llava.json (one LLaVA JSON array) or OUT.sharegpt.json + dataset_info.json
    (LLaMA-Factory); repeatable"""
    export_only: bool = False
    """only convert the existing OUT to the --export formats; no API calls"""
    dataset_name: str | None = None
    """name of the dataset_info.json entry for sharegpt (default: OUT's name)"""

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> tuple[CaptionOptions | None, list[str]]:
        """(options, []) from parsed arguments, or (None, every problem, each saying what to do)."""
        data = {name: getattr(args, name) for name in cls.model_fields}
        options, problems = check_data(cls, data, flags=True)
        # argparse has typed every value already, so the cross-checks can read unchecked values too: a bad number
        # and a missing folder are reported together.
        problems += (options or cls.model_construct(**data)).problems()
        return (options if not problems else None), problems

    def problems(self) -> list[str]:
        """The checks across options and of the paths they name."""
        problems = []
        if not self.image_dir.is_dir():
            problems.append(f"IMAGE_DIR {self.image_dir} is not a folder: give the folder holding the images")
        if self.output.is_dir():
            problems.append(f"-o {self.output} is a folder: give a file name such as {self.output / 'captions.jsonl'}")
        if not self.model and not self.export_only:
            problems.append("--model is required: name the vision model, e.g. --model gpt-4o-mini")
        if self.export_only and not self.export:
            problems.append("--export-only needs at least one --export llava-json|sharegpt")
        if self.export_only and not self.output.is_file():
            problems.append(f"--export-only: {self.output} does not exist yet; run the caption command first")
        if self.prompt_file is not None and not self.prompt_file.is_file():
            problems.append(f"--prompt-file {self.prompt_file} does not exist")
        if self.raw_prompt and self.prompt_file is None:
            problems.append("--raw-prompt sends the text of --prompt-file as it is: give --prompt-file too")
        if self.raw_prompt and self.response_format not in ("auto", "text"):
            problems.append(f"--raw-prompt asks for plain text: --response-format {self.response_format} cannot apply")
        if self.price_table is not None and not self.price_table.is_file():
            problems.append(f"--price-table {self.price_table} does not exist")
        sampler_flags = [f"--{name.replace('_', '-')}" for name in ("sampler_base_url", "sampler_model")
                         if getattr(self, name)]
        if self.task == "preference":
            if not self.export_only and not (self.sampler_base_url and self.sampler_model):
                problems.append("--task preference judges answers drawn from your model: give --sampler-base-url URL "
                                "(e.g. `llava-kit serve`'s http://127.0.0.1:8000/v1) and --sampler-model NAME")
            if self.batch:
                problems.append("--task preference samples answers before each judge request, which the Batch API "
                                "cannot do: drop --batch")
            if self.raw_prompt:
                problems.append("--raw-prompt does not apply to --task preference (its --prompt-file holds questions)")
            if self.export:
                problems.append("--export converts conversations; --task preference writes pairs that `train "
                                "stage=dpo` reads as they are: drop --export")
        elif sampler_flags:
            problems.append(f"{', '.join(sampler_flags)} only apply to --task preference")
        if self.batch and self.rpm:
            problems.append("--rpm does not apply to --batch (the Batch API has its own limits): drop one of them")
        return problems

    def run_options(self) -> RunOptions:
        """What to caption and how hard to try (data_gen.run)."""
        from data_gen.run import RunOptions

        return RunOptions(
            image_dir=self.image_dir, output=self.output, task=self.task, prompt_file=self.prompt_file,
            raw_prompt=self.raw_prompt, seed=self.seed, concurrency=self.concurrency, rpm=self.rpm,
            max_retries=self.max_retries, validation_retries=self.validation_retries, retry_delay=self.retry_delay,
            limit=self.limit, progress=not self.no_progress)

    def client_options(self) -> ClientOptions:
        """Where and how to send requests (data_gen.client); --raw-prompt reads plain text answers."""
        from data_gen.client import ClientOptions

        return ClientOptions(
            model=self.model, base_url=self.base_url, timeout=self.timeout, detail=self.detail,
            response_format="text" if self.raw_prompt else self.response_format, max_tokens=self.max_tokens,
            temperature=self.temperature)

    def sampler_options(self) -> SamplerOptions | None:
        """The sampled model's endpoint and sampling (data_gen.preference), for --task preference."""
        if self.task != "preference":
            return None
        from data_gen.preference import SamplerOptions

        return SamplerOptions(base_url=self.sampler_base_url, model=self.sampler_model, samples=self.samples,
                              temperature=self.sampler_temperature, max_tokens=self.sampler_max_tokens,
                              timeout=self.timeout)

    def batch_options(self) -> BatchOptions:
        """Batch API limits and polling (data_gen.batch)."""
        from data_gen.batch import BatchOptions

        return BatchOptions(self.batch_max_requests, self.batch_max_bytes, self.poll_interval)
