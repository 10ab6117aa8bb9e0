"""Client helpers (retry timing, rate limiting, redaction, format fallback) and the append-only store."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from pathlib import Path

import pytest
from dg_support import API_KEY, make_images

from data_gen.client import (
    ClientOptions,
    FatalAPIError,
    RateLimiter,
    TransientError,
    VisionClient,
    backoff_delay,
    parse_retry_after,
    redact,
)
from data_gen.images import encode_image
from data_gen.prompts import get_task
from data_gen.store import CorruptOutputError, OutputStore, errors_path, read_jsonl
from data_gen.testing.stub_server import StubServer


def test_retry_after_headers() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parse_retry_after({"retry-after": when}) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "99999"}) == 600.0  # capped


def test_backoff_honours_retry_after_and_grows_otherwise() -> None:
    for _ in range(200):
        assert 2.0 <= backoff_delay(1, 2.0) <= 2.55
        assert 0.5 <= backoff_delay(1, None, base=1.0) <= 1.0
        assert 4.0 <= backoff_delay(4, None, base=1.0) <= 8.0
        assert backoff_delay(30, None, base=1.0, cap=60) <= 60


def test_redact_hides_the_key_and_key_shaped_strings() -> None:
    text = f"Incorrect API key provided: {API_KEY}. Also sk-proj-abcdef123456 is wrong."
    clean = redact(text, API_KEY)
    assert API_KEY not in clean and "sk-proj-abcdef123456" not in clean


def test_rate_limiter_spaces_requests_and_pauses() -> None:
    async def starts(limiter: RateLimiter, n: int) -> list[float]:
        out: list[float] = []

        async def one() -> None:
            await limiter.acquire()
            out.append(time.monotonic())

        await asyncio.gather(*(one() for _ in range(n)))
        return sorted(out)

    times = asyncio.run(starts(RateLimiter(rpm=1200), 5))  # one start every 50 ms
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.045, gaps

    limiter = RateLimiter(rpm=None)
    limiter.pause(0.2)
    begin = time.monotonic()
    times = asyncio.run(starts(limiter, 3))
    assert times[0] - begin >= 0.19


def test_rate_limiter_keeps_its_spacing_when_the_loop_stalls() -> None:
    async def starts() -> list[float]:
        limiter = RateLimiter(rpm=1200)  # one start every 50 ms
        out: list[float] = []

        async def one() -> None:
            await limiter.acquire()
            out.append(time.monotonic())

        async def stall() -> None:
            await asyncio.sleep(0.03)
            time.sleep(0.15)  # the process is not scheduled (a busy machine): every timer due meanwhile is late

        await asyncio.gather(stall(), *(one() for _ in range(5)))
        return sorted(out)

    times = asyncio.run(starts())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.045, gaps  # late waiters do not start together


def test_rate_limiter_pause_holds_back_a_waiter_already_asleep() -> None:
    async def main() -> float:
        limiter = RateLimiter(rpm=600)  # one start every 100 ms
        await limiter.acquire()
        first = time.monotonic()
        waiter = asyncio.ensure_future(limiter.acquire())
        await asyncio.sleep(0)  # the waiter is now asleep until its turn, 100 ms on
        limiter.pause(0.3)  # a 429 with Retry-After arrives meanwhile
        await waiter
        return time.monotonic() - first

    assert asyncio.run(main()) >= 0.3


@pytest.mark.parametrize(("formats", "modes"), [
    (("json_schema", "json_object"), ["json_schema"]),
    (("json_object",), ["json_schema", "json_object"]),
    ((), ["json_schema", "json_object", None]),
])
def test_structured_output_falls_back(tmp_path: Path, formats: tuple[str, ...], modes: list[str | None]) -> None:
    image = encode_image(make_images(tmp_path, 1)[0], "low")
    results = {}
    for name in ("caption", "conversation", "reasoning"):
        with StubServer(formats=formats) as stub:
            async def ask(stub: StubServer = stub, name: str = name):
                client = VisionClient(ClientOptions(model="m", base_url=stub.base_url, timeout=2), API_KEY)
                try:
                    return [await client.complete(get_task(name), image) for _ in range(2)], client.mode
                finally:
                    await client.close()

            replies, final_mode = asyncio.run(ask())
            seen = [(r["body"].get("response_format") or {}).get("type") for r in stub.requests]
        # the first request walks down the modes; the second starts where the first ended
        assert seen == modes + modes[-1:], seen
        assert final_mode == (modes[-1] or "text")
        results[name] = replies
    from data_gen.validate import validated_turns

    for name, replies in results.items():
        for reply in replies:
            assert validated_turns(get_task(name), reply.finish_reason, reply.refusal, reply.content)


def test_forced_format_is_not_downgraded(tmp_path: Path) -> None:
    image = encode_image(make_images(tmp_path, 1)[0], "low")
    with StubServer(formats=()) as stub:
        async def ask():
            client = VisionClient(ClientOptions(model="m", base_url=stub.base_url, response_format="json_schema",
                                                timeout=2), API_KEY)
            try:
                await client.complete(get_task("caption"), image)
            finally:
                await client.close()

        with pytest.raises(FatalAPIError, match="rejected the request"):
            asyncio.run(ask())
        assert stub.count() == 1


@pytest.mark.parametrize(("fault", "reason"), [
    ("429", "rate_limited"), ("500", "server_error"), ("503", "server_error"), ("hang", "timeout"),
    ("drop", "connection_error"), ("malformed", "malformed_response"), ("empty_choices", "empty_choices"),
])
def test_transient_faults_are_classified(tmp_path: Path, fault: str, reason: str) -> None:
    image = encode_image(make_images(tmp_path, 1)[0], "low")
    with StubServer(hang_seconds=1.0) as stub:
        stub.enqueue(fault)

        async def ask():
            client = VisionClient(ClientOptions(model="m", base_url=stub.base_url, timeout=0.3), API_KEY)
            try:
                await client.complete(get_task("caption"), image)
            finally:
                await client.close()

        with pytest.raises(TransientError) as err:
            asyncio.run(ask())
    assert err.value.reason == reason
    if fault == "429":
        assert err.value.retry_after == pytest.approx(stub.retry_after)


def test_store_repairs_a_cut_last_line_and_appends_once(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "x": 1}\n{"id": "b", "x": 2}\n{"id": "c", "x"')
    store = OutputStore(out)
    assert store.done == {"a", "b"}
    assert store.append({"id": "c", "x": 3}) is True
    assert store.append({"id": "a", "x": 9}) is False  # already done: never a duplicate line
    store.close()
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b", "c"]
    assert out.read_text().endswith("\n")


def test_store_refuses_damage_in_the_middle(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\nGARBAGE\n{"id": "b"}\n')
    with pytest.raises(CorruptOutputError, match="out.jsonl:2"):
        OutputStore(out)


def test_readonly_store_does_not_touch_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\n{"id": "b"')
    OutputStore(out, readonly=True)
    assert out.read_text() == '{"id": "a"}\n{"id": "b"'
    assert errors_path(out).name == "out.errors.jsonl"
    assert json.loads(out.read_text().splitlines()[0]) == {"id": "a"}
