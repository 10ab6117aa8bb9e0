"""What `llava-kit serve --studio` and `llava-kit jobs` can be told: the studio's settings, from which their options are
derived (like llava_kit/serve/settings.py for the server).

    settings = StudioSettings(studio="~/studio", max_jobs=2)
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from llava_kit.schema import Schema

SERVE_FIELDS = ("studio", "max_jobs", "max_upload_mb", "upload_timeout")


def default_studio_dir() -> str:
    """$LLAVA_KIT_HOME/studio (default ~/.cache/llava-kit/studio): where `--studio` without a folder keeps jobs."""
    return str(Path(os.environ.get("LLAVA_KIT_HOME", Path.home() / ".cache" / "llava-kit")) / "studio")


class StudioSettings(Schema):
    """Settings of the training studio (llava_kit/studio/)."""

    studio: str | None = None
    """run the training studio with its jobs, runs and uploads in this folder: the fine-tuning API (/v1/files,
    /v1/fine_tuning/jobs) and the Train, Runs and Compare pages (without a folder: $LLAVA_KIT_HOME/studio; off by
    default: anyone who reaches the server can then start jobs on this machine, so give --api-key beyond localhost)"""
    max_jobs: int = Field(1, ge=1)
    """jobs the studio runs at once; more wait in its queue"""
    max_upload_mb: float = Field(1024.0, gt=0)
    """largest upload in MB (a zip may extract to 10 times this)"""
    upload_timeout: float = Field(600.0, gt=0)
    """seconds an upload may take to arrive"""

    @property
    def max_upload_bytes(self) -> int:
        """`max_upload_mb` in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)
