"""The typed spec files llava-kit writes beside weights, each with a format version.

    RUN_DIR/projector.json                ProjectorSpec: the projector's constructor arguments and its provenance
    MERGED_DIR/llava_kit.json             MergedSpec: how a merged model is prompted, its projector's provenance
    MERGED_TEXT_DIR/llava_kit_text.json   TextModelSpec: how a merged text model is prompted
    (a merged model's architecture is its config.json: `llava_kit.model.llava.LlavaKitConfig`)

Every file is read through `read_spec` (a missing key, a wrong type or a newer format version is one clear
`ModelLoadError` naming the file) and written through `write_spec`, never as a bare dict with `.get` fallbacks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from llava_kit.errors import ModelLoadError, PathNotFoundError

PROJECTOR_SPEC = "projector.json"
TEXT_SPEC = "llava_kit_text.json"
MERGED_SPEC = "llava_kit.json"
COMPLETION = "completion"
"""The prompting "template" of a text-pt model: the prompt is continued as plain text, no chat template."""


class Spec(BaseModel):
    """Base of the spec files: unknown keys are kept (a file from a newer minor release still reads) and
    `version` says which layout it is."""

    model_config = ConfigDict(extra="allow")
    version: int = 1
    """Layout version of the file; a reader refuses versions newer than it knows."""

    LATEST: ClassVar[int] = 1
    """The newest version this llava-kit writes and reads."""


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class InferenceSettings:
    """How prompts and images are prepared for a model (taken from its training config)."""

    template: str
    """A template name of data/templates.py, or `completion` (a text-pt model continues plain text)."""
    system_prompt: str | None = None
    image_aspect: str = "pad"
    """`pad` to a square of the tower's mean colour, or `resize`."""
    max_seq_len: int = 2048
    """The training max_seq_len (prompts may be longer at inference, up to the LLM's positions)."""

    def to_dict(self) -> dict:
        """A JSON-ready dict of the settings."""
        return dataclasses.asdict(self)


class Provenance(BaseModel):
    """What a projector was trained with; `load_projector` refuses a base that differs."""

    model_config = ConfigDict(extra="allow")
    vision: dict = Field(default_factory=dict)
    """The tower's `describe()`: backend, name_or_path, feature_layer, select_strategy, geometry."""
    llm: str | None = None
    """The LLM's name or path."""
    template: str | None = None
    stage: str | None = None
    identity: dict | None = None
    """Fingerprints of the tower weights, LLM family and LLM embeddings (`store.provenance.base_identity`)."""


class ProjectorSpec(Spec):
    """RUN_DIR/projector.json: the projector's constructor arguments plus what it was trained against."""

    name: str | None
    options: dict = Field(default_factory=dict)
    vision_width: int
    llm_width: int
    grid: list[int]
    has_cls: bool
    num_output_tokens: int
    """Tokens per view (per image at the fixed strategy)."""
    image_strategy: dict | None = None
    """None: the fixed strategy; AnyRes: its settings (`AnyRes.to_dict()`), as the projector was trained."""
    trained_with: Provenance = Field(default_factory=Provenance)


class TextModelSpec(Spec):
    """MERGED_TEXT_DIR/llava_kit_text.json: a merged text run is a plain transformers LLM plus this file."""

    format: str = "llava-kit-text"
    stage: str
    inference: InferenceSettings
    merged_from: str | None = None


class MergedSpec(Spec):
    """MERGED_DIR/llava_kit.json: how a merged model is prompted and what its projector was trained with.

    Version 2: the model is a `LlavaModel` transformers directory beside it (config.json, model.safetensors).
    Version 1: the older layout with vision/, llm/ and projector.safetensors subparts."""

    LATEST: ClassVar[int] = 2
    format: str = "llava-kit"
    image_token: str = "<image>"
    projector: ProjectorSpec
    inference: InferenceSettings
    merged_from: str | None = None


SpecT = TypeVar("SpecT", bound=Spec)


def read_spec(path: str | Path, spec_class: type[SpecT]) -> SpecT:
    """Read and check a spec file; every problem is a `ModelLoadError` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise PathNotFoundError(f"{path} is missing; the directory was not written by llava-kit, or not completely")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path} is not valid JSON ({err}); the file is damaged: write the directory again "
                             "(`llava-kit train` / `merge`)") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(data).__name__}, not an object; the file is damaged")
    version = data.get("version", 1)
    if not isinstance(version, int) or version > spec_class.LATEST:
        raise ModelLoadError(f"{path} has format version {version!r}; this llava-kit reads {spec_class.__name__} up "
                             f"to version {spec_class.LATEST}. It was written by a newer llava-kit: upgrade llava-kit")
    try:
        return spec_class.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in err.errors())
        raise ModelLoadError(f"{path} does not hold a valid {spec_class.__name__}: {problems}") from None


def write_spec(spec: Spec, path: str | Path) -> None:
    """Write a spec file (pretty JSON, the version included)."""
    Path(path).write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
