"""The model worker's batching: requests sent together are generated together (no model: a stub service).

No outcome here depends on the machine's speed: every request has entered `prepare()` before any is submitted (a
barrier in the stub's preprocessing), and the worker's gather wait is raised far above the stub's delays (it ends
as soon as nothing is being prepared, so the tests are no slower for it)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from llava_kit.inference import Completion, SamplingParams
from llava_kit.serve import worker as worker_module
from llava_kit.serve.worker import ModelWorker


@pytest.fixture(autouse=True)
def patient_gather(monkeypatch):
    monkeypatch.setattr(worker_module, "GATHER_S", 30.0)


class StubService:
    """What the worker asks of a generation service; encoding takes the time a message says."""

    supports_images = False

    def __init__(self, requests: int):
        self.all_preparing = threading.Barrier(requests)

    def preprocess(self, images):
        self.all_preparing.wait(timeout=60)  # every request is being prepared before the first can be submitted
        return None

    def encode(self, messages, n_images, image_sizes=None):
        time.sleep(messages[0]["delay"])
        return [1, 2, 3]

    def generate(self, requests):
        time.sleep(0.05)
        return [Completion("ok", "stop", 3, 1) for _ in requests]


def batches_of(delays: list[float], max_batch_size: int = 8) -> list[int]:
    worker = ModelWorker("stub", StubService(len(delays)), max_batch_size=max_batch_size).start()

    async def one(delay: float):
        messages = [{"role": "user", "content": "hi", "delay": delay}]
        request = await asyncio.to_thread(worker.prepare, messages, [], SamplingParams())
        return await worker.submit(request).result()

    async def together():
        return await asyncio.gather(*(one(delay) for delay in delays))

    try:
        assert [c.text for c in asyncio.run(together())] == ["ok"] * len(delays)
    finally:
        worker.stop()
    return worker.batch_sizes


def test_requests_still_being_prepared_join_the_batch():
    # The first request is ready at once, the others while it would already be generating: without waiting for
    # them the worker answered [1, 3].
    assert batches_of([0.0, 0.02, 0.02, 0.02]) == [4]


def test_the_batch_size_limit_still_holds():
    assert sorted(batches_of([0.0, 0.01, 0.01, 0.01, 0.01], max_batch_size=2)) == [1, 2, 2]
