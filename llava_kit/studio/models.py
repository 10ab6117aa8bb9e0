"""Finished training jobs' models, served by the server's model workers under their `fine_tuned_model` names.

    serve_fine_tuned_models(studio, app.state.workers, settings)   # every finished job's model, and each new one

A studio may hold many fine-tuned models and a server chats with few of them, so each is opened the first time a
request (or the web chat) uses it, by `LazyService`; it then stays loaded until the server stops.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from llava_kit.inference.service import GenerationService
from llava_kit.serve.settings import ServerSettings
from llava_kit.serve.worker import ModelWorkers
from llava_kit.studio.workspace import Studio

logger = logging.getLogger(__name__)


class LazyService:
    """A generation service that opens its model directory on first use: `supports_images` is read from the
    directory's files; any other attribute a model worker asks for (preprocess, encode, generate, ...) is the loaded
    GenerationService's own, so the two cannot drift apart."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.supports_images = reads_images(self.model_dir)
        self._service: GenerationService | None = None
        self._lock = threading.Lock()

    @property
    def service(self) -> GenerationService:
        """The loaded service (loaded now, once, if it has not been)."""
        with self._lock:
            if self._service is None:
                from llava_kit.loader import open_model_dir

                logger.info("studio: loading %s on first use", self.model_dir)
                self._service = GenerationService.from_loaded(open_model_dir(self.model_dir))
            return self._service

    def __getattr__(self, name: str):
        if name.startswith("_"):  # (not yet set during __init__, copy or pickling: no load for those)
            raise AttributeError(name)
        return getattr(self.service, name)


def reads_images(model_dir: Path) -> bool:
    """Whether the model in `model_dir` reads images, from its files alone (nothing is loaded)."""
    from llava_kit.config import load_saved_config
    from llava_kit.loader import directory_kind

    kind = directory_kind(model_dir)
    if kind == "run":
        return load_saved_config(model_dir).modality == "multimodal"
    return kind in ("merged", "hf-llava")


def serve_fine_tuned_models(studio: Studio, workers: ModelWorkers, settings: ServerSettings) -> None:
    """Add a worker for every finished training job's model of `studio`, and for each one that finishes later."""
    from llava_kit.serve.server import make_worker

    def add(name: str, model_dir: Path) -> None:
        if name in workers:
            return
        try:
            service = LazyService(model_dir)
        except Exception:  # noqa: BLE001 (one damaged directory must not keep the others from being served)
            logger.exception("studio: cannot serve %s from %s", name, model_dir)
            return
        worker = make_worker(name, service, settings)
        if workers.add(worker):
            logger.info("studio: serving %s (%s)", name, model_dir)
        else:  # added meanwhile
            worker.stop()

    for name, model_dir in studio.fine_tuned_models().items():
        add(name, model_dir)
    studio.on_model.append(add)
