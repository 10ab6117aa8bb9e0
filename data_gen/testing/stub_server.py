"""An OpenAI-compatible stub server for tests and benchmarks (stdlib only, 127.0.0.1).

    with StubServer(latency=0.2) as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="sk-test")

It answers `POST /v1/chat/completions` with plausible answers for the four caption tasks (shaped by
the request's `response_format`), and can inject the failures a real vision API produces: faults are
taken first from a FIFO queue (`server.enqueue("429", "500", ...)`), then from `server.rule(body)`
when set, else the request succeeds. It also serves the Files and Batches endpoints (`--batch`).

Tests that race a client process against a signal hold requests instead of sleeping: after
`server.hold(after=4)` the next 4 requests are answered and every later one waits, unanswered, until
`server.release()`; `server.wait_held(n)` returns once n requests are provably in flight. A run held
that way cannot finish before the test has sent its signal, however busy the machine is.

Fault names: see `FAULTS`.
"""

from __future__ import annotations

import collections
import email.parser
import email.policy
import json
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = {
    "ok": "a valid answer",
    "429": "rate limited, with Retry-After (server.retry_after seconds)",
    "insufficient_quota": "429 with code insufficient_quota (not retryable)",
    "401": "authentication error that echoes the key, like a careless server",
    "403": "permission denied",
    "404": "model not found",
    "400_format": "400 saying response_format is not supported",
    "500": "internal server error",
    "503": "service unavailable",
    "hang": "no answer for server.hang_seconds (longer than the client timeout)",
    "drop": "connection closed without a response",
    "malformed": "200 with a body that is not JSON",
    "empty_choices": "200 with choices: []",
    "refusal": "message.refusal set, no content",
    "refusal_text": "an apology instead of an answer, as content",
    "length": "finish_reason length with a truncated answer",
    "leak": "an answer that mentions its source (the caption)",
    "empty": "an empty answer",
}

_SENTENCES = [
    "A red circle sits near the center of a light gray background.",
    "A small blue square rests on a plain white background.",
    "A yellow star stands out against a pale gray backdrop.",
    "A green triangle points upward on a white canvas.",
]


def _text_for(rng: random.Random, words: int = 0) -> str:
    text = rng.choice(_SENTENCES)
    return text if not words else " ".join([text] * max(1, words // 10))


def _from_schema(schema: dict[str, Any], rng: random.Random) -> Any:
    """Fill a JSON schema with plausible values (what a strict structured-output server returns)."""
    kind = schema.get("type")
    if kind == "object":
        return {name: _from_schema(sub, rng) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        count = max(int(schema.get("minItems", 0)), 3)
        return [_from_schema(schema.get("items", {"type": "string"}), rng) for _ in range(count)]
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    return _text_for(rng)


def _guess_task(prompt: str) -> str:
    """Which caption task a request is for, from the JSON shape its prompt asks for."""
    if '"turns"' in prompt:
        return "conversation"
    if '"question"' in prompt:
        return "reasoning"
    if '"description"' in prompt:
        return "detail"
    return "caption"


def judge_verdict(prompt: str, rng: random.Random) -> dict[str, Any]:
    """The preference judge's answer to a prompt listing `Answer N:` candidates: distinct best and worst."""
    count = max(2, len(re.findall(r"^Answer \d+:", prompt, flags=re.M)))
    best, worst = rng.sample(range(1, count + 1), 2)
    scores = [5] * count
    scores[best - 1], scores[worst - 1] = 9, 2
    return {"scores": scores, "best": best, "worst": worst, "reason": "The worst answer names a shape that is not there."}


def answer_for(body: dict[str, Any], rng: random.Random) -> str:
    """A valid answer to a chat completion request, in the format its `response_format` asks for."""
    fmt = body.get("response_format") or {}
    if '"best": N' in _prompt_text(body):  # the preference task's judge (data_gen/preference.py)
        return json.dumps(judge_verdict(_prompt_text(body), rng))
    if fmt.get("type") == "json_schema":
        return json.dumps(_from_schema(fmt["json_schema"]["schema"], rng))
    task = _guess_task(_prompt_text(body))
    q, a = "What shape is in the image?", _text_for(rng)
    shaped: dict[str, Any] = {
        "caption": {"caption": a},
        "detail": {"description": _text_for(rng, 40)},
        "conversation": {"turns": [{"question": q, "answer": a}, {"question": "What color is it?", "answer": a}]},
        "reasoning": {"question": "Why might someone draw this?", "answer": a},
    }
    if fmt.get("type") == "json_object":
        return json.dumps(shaped[task])
    # Plain-text servers: answer in prose, as a model that ignores the requested format would.
    if task == "conversation":
        return "\n".join(f"Q: {t['question']}\nA: {t['answer']}" for t in shaped[task]["turns"])
    if task == "reasoning":
        return f"Question: {shaped[task]['question']}\nAnswer: {shaped[task]['answer']}"
    return a if task == "caption" else shaped[task]["description"]


def _prompt_text(body: dict[str, Any]) -> str:
    parts = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(parts)


def completion(content: str | None, *, model: str = "stub", finish_reason: str = "stop",
               refusal: str | None = None) -> dict[str, Any]:
    """A chat.completion object as the OpenAI API returns it."""
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:12],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": refusal},
            "finish_reason": finish_reason,
            "logprobs": None,
        }],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
    }


class StubServer:
    """A threaded OpenAI-compatible HTTP server on 127.0.0.1 with injectable faults."""

    def __init__(self, latency: float = 0.0, *, retry_after: float = 0.05, hang_seconds: float = 5.0,
                 formats: tuple[str, ...] = ("json_schema", "json_object"), api_key: str | None = None,
                 batch_polls: int = 1, seed: int = 0) -> None:
        self.latency = latency
        self.retry_after = retry_after
        self.hang_seconds = hang_seconds
        self.formats = formats  # response_format types this server accepts; others get a 400
        self.api_key = api_key  # when set, other keys get a 401
        self.batch_polls = batch_polls  # GETs of a batch that still say in_progress
        self.batch_outcome = "completed"  # or "expired" / "failed": the batch ends without results
        self.batch_get_faults = 0  # the next N status checks of a batch answer 503
        self.batch_create_attempts = 0
        self.batch_create_fault: str | None = None  # "500" or "insufficient_quota": every batch create fails
        self.rule: Callable[[dict[str, Any]], str | None] | None = None
        self.requests: list[dict[str, Any]] = []  # every chat request: {"fault", "body", "auth", "time"}
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._lock = threading.RLock()
        self._released = threading.Event()
        self._hold_changed = threading.Condition(self._lock)
        self._holding = False
        self._hold_pass = 0  # requests still let through before holding starts
        self._held = 0  # requests waiting for release() now
        self._rng = random.Random(seed)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The URL to pass as `base_url` to the openai client (ends in /v1)."""
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> StubServer:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        handler = type("Handler", (_Handler,), {"stub": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # hanging handlers must not keep stop() waiting
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release hanging and held requests and shut the server down."""
        self._released.set()
        self.release()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------------------
    def enqueue(self, *faults: str) -> None:
        """Give the next chat requests these faults, in arrival order."""
        for fault in faults:
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        with self._lock:
            self._queue.extend(faults)

    def next_fault(self, body: dict[str, Any]) -> str:
        """The fault for one arriving request: queued first, then the rule, else "ok"."""
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        if self.rule is not None:
            return self.rule(body) or "ok"
        return "ok"

    # -- holding requests (for tests that must not depend on timing) -----------------------------
    def hold(self, after: int = 0) -> None:
        """Answer the next `after` chat requests, then hold every later one unanswered until `release()`."""
        with self._hold_changed:
            self._holding = True
            self._hold_pass = after

    def release(self) -> None:
        """Answer the held requests (with their faults) and stop holding new ones."""
        with self._hold_changed:
            self._holding = False
            self._hold_changed.notify_all()

    @property
    def held(self) -> int:
        """How many chat requests are waiting for `release()` now (a client that gave up still counts)."""
        with self._lock:
            return self._held

    def wait_held(self, count: int, timeout: float = 120.0) -> None:
        """Block until at least `count` requests are held; TimeoutError after `timeout` seconds.

        The timeout only turns a broken test into a failure instead of a hang: nothing waits for it.
        """
        with self._hold_changed:
            if not self._hold_changed.wait_for(lambda: self._held >= count, timeout):
                raise TimeoutError(f"only {self._held} of {count} requests held after {timeout:g}s")

    def _wait_if_held(self) -> None:
        """Called by each chat request on arrival: returns at once, or when `release()` is called."""
        with self._hold_changed:
            if not self._holding:
                return
            if self._hold_pass > 0:
                self._hold_pass -= 1
                return
            self._held += 1
            self._hold_changed.notify_all()
            try:
                while self._holding:
                    self._hold_changed.wait()
            finally:
                self._held -= 1

    def count(self, fault: str | None = None) -> int:
        """How many chat requests arrived (with this fault, when given)."""
        with self._lock:
            return sum(1 for r in self.requests if fault is None or r["fault"] == fault)

    def chat_response(self, body: dict[str, Any], fault: str) -> tuple[int, dict[str, str], dict[str, Any] | str]:
        """Status, headers and body for a chat request with the given fault (no I/O, no sleeping)."""
        model = body.get("model", "stub")
        fmt = (body.get("response_format") or {}).get("type")
        if fault == "ok" and fmt and fmt not in self.formats:
            fault = "400_format"
        with self._lock:
            rng = random.Random(self._rng.random())
        if fault == "ok":
            return 200, {}, completion(answer_for(body, rng), model=model)
        if fault == "429":
            headers = {"retry-after-ms": str(int(self.retry_after * 1000)), "retry-after": f"{self.retry_after:g}"}
            return 429, headers, _error("Rate limit reached for requests", "requests", "rate_limit_exceeded")
        if fault == "insufficient_quota":
            return 429, {}, _error("You exceeded your current quota, please check your plan and billing details.",
                                   "insufficient_quota", "insufficient_quota")
        if fault == "401":
            auth = body.get("_auth", "")
            return 401, {}, _error(f"Incorrect API key provided: {auth}.", "invalid_request_error", "invalid_api_key")
        if fault == "403":
            return 403, {}, _error("You are not allowed to use this model.", "invalid_request_error", None)
        if fault == "404":
            return 404, {}, _error(f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found")
        if fault == "400_format":
            return 400, {}, _error(f"response_format type {fmt!r} is not supported by this server.",
                                   "invalid_request_error", None)
        if fault in ("500", "503"):
            return int(fault), {}, _error("The server had an error while processing your request.", "server_error", None)
        if fault == "malformed":
            return 200, {}, '{"id": "chatcmpl-broken", "choices": [{"message": '
        if fault == "empty_choices":
            return 200, {}, {**completion("x", model=model), "choices": []}
        if fault == "refusal":
            return 200, {}, completion(None, model=model, refusal="I'm sorry, I can't help with that request.")
        if fault == "refusal_text":
            return 200, {}, completion("I'm sorry, but I can't assist with that.", model=model)
        if fault == "length":
            return 200, {}, completion('{"caption": "A red circle sits near the cen', model=model,
                                       finish_reason="length")
        if fault == "leak":
            text = "According to the caption, a red circle sits on a gray background."
            if fmt in ("json_schema", "json_object"):
                text = json.dumps({k: (text if not isinstance(v, list) else v) for k, v in
                                   json.loads(answer_for(body, rng)).items()})
            return 200, {}, completion(text, model=model)
        if fault == "empty":
            return 200, {}, completion("", model=model)
        raise ValueError(f"fault {fault!r} has no canned response")

    # -- batches ---------------------------------------------------------------------------------
    def run_batch(self, batch: dict[str, Any]) -> None:
        """Answer every line of a batch input file; results land in output/error files, shuffled."""
        lines = self.files[batch["input_file_id"]].decode().splitlines()
        outputs, errors = [], []
        for line in lines:
            request = json.loads(line)
            body = request["body"]
            fault = self.next_fault(body)
            with self._lock:
                self.requests.append({"fault": fault, "body": body, "auth": "", "time": time.time(), "batch": True})
            if fault in ("hang", "drop", "malformed"):
                fault = "500"  # transport faults do not exist inside a batch
            status, _, payload = self.chat_response(body, fault)
            result = {"id": "batch_req_" + uuid.uuid4().hex[:8], "custom_id": request["custom_id"],
                      "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": payload},
                      "error": None}
            (outputs if status == 200 else errors).append(json.dumps(result))
        self._rng.shuffle(outputs)  # the real Batch API returns results out of order
        batch["output_file_id"] = self._add_file("\n".join(outputs) + "\n") if outputs else None
        batch["error_file_id"] = self._add_file("\n".join(errors) + "\n") if errors else None
        batch["request_counts"] = {"total": len(lines), "completed": len(outputs), "failed": len(errors)}

    def _add_file(self, text: str) -> str:
        file_id = "file-" + uuid.uuid4().hex[:16]
        self.files[file_id] = text.encode()
        return file_id


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a client opening 16 connections at once would see
    # resets and 1-second SYN retries that no real server causes.
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout, cancelled after a fatal error) closes its socket while a
        # handler is still writing: expected here, not worth a traceback on the test's stderr.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _error(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    stub: StubServer  # set on the subclass made by StubServer.start
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    # Without TCP_NODELAY, headers and body leave as two packets and Nagle + delayed ACK add ~40 ms per
    # response: the stub would measure the kernel, not the client.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: tests read stderr of the client, not of the server

    def _send(self, status: int, payload: dict[str, Any] | str | bytes, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else (
            payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        raw = self._body()
        if self.path.endswith("/chat/completions"):
            self._chat(raw)
        elif self.path.endswith("/files"):
            self._upload(raw)
        elif self.path.endswith("/batches"):
            self._create_batch(json.loads(raw))
        else:
            self._send(404, _error(f"no route {self.path}", "invalid_request_error", None))

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        stub = self.stub
        parts = self.path.split("?")[0].rstrip("/").split("/")
        if len(parts) >= 3 and parts[-3] == "files" and parts[-1] == "content" and parts[-2] in stub.files:
            self._send(200, stub.files[parts[-2]])
        elif len(parts) >= 2 and parts[-2] == "batches" and parts[-1] in stub.batches:
            with stub._lock:
                fail, stub.batch_get_faults = stub.batch_get_faults > 0, max(0, stub.batch_get_faults - 1)
            if fail:
                self._send(503, _error("The server is overloaded.", "server_error", None))
                return
            batch = stub.batches[parts[-1]]
            with stub._lock:
                batch["_polls"] += 1
                if batch["status"] == "in_progress" and batch["_polls"] > stub.batch_polls:
                    if stub.batch_outcome == "completed":
                        stub.run_batch(batch)
                    elif stub.batch_outcome == "failed":
                        batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "line": 1,
                                                                       "message": "stub: batch failed"}]}
                    batch["status"] = stub.batch_outcome
                    batch["completed_at"] = int(time.time())
            self._send(200, {k: v for k, v in batch.items() if not k.startswith("_")})
        else:
            self._send(404, _error(f"no route {self.path}", "invalid_request_error", None))

    def _chat(self, raw: bytes) -> None:
        stub = self.stub
        auth = self.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, _error("request body is not JSON", "invalid_request_error", None))
            return
        fault = stub.next_fault(body)
        if stub.api_key is not None and auth != stub.api_key:
            fault = "401"
        with stub._lock:
            stub.requests.append({"fault": fault, "body": body, "auth": auth, "time": time.time()})
        stub._wait_if_held()
        if stub.latency:
            time.sleep(stub.latency)
        if fault == "hang":
            stub._released.wait(stub.hang_seconds)
            self.close_connection = True
            return
        if fault == "drop":
            self.close_connection = True  # the handler returns without a response: the socket closes
            return
        status, headers, payload = stub.chat_response({**body, "_auth": auth}, fault)
        self._send(status, payload, headers)

    def _upload(self, raw: bytes) -> None:
        # Multipart parsing with the email package: cgi is gone from newer Pythons.
        head = f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
        fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        content = fields["file"].get_payload(decode=True)
        purpose = fields["purpose"].get_payload(decode=True).decode()
        file_id = self.stub._add_file(content.decode())
        self._send(200, {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                         "filename": fields["file"].get_filename() or "upload.jsonl", "purpose": purpose,
                         "status": "processed"})

    def _create_batch(self, body: dict[str, Any]) -> None:
        stub = self.stub
        with stub._lock:
            stub.batch_create_attempts += 1
        if stub.batch_create_fault is not None:
            status, headers, payload = stub.chat_response(body, stub.batch_create_fault)
            self._send(status, payload, headers)
            return
        if body.get("input_file_id") not in stub.files:
            self._send(400, _error("input file not found", "invalid_request_error", None))
            return
        batch_id = "batch_" + uuid.uuid4().hex[:16]
        batch = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                 "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                 "status": "in_progress", "output_file_id": None, "error_file_id": None,
                 "created_at": int(time.time()), "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": body.get("metadata"), "_polls": 0}
        with stub._lock:
            stub.batches[batch_id] = batch
        self._send(200, {k: v for k, v in batch.items() if not k.startswith("_")})


def main(argv: list[str] | None = None) -> None:
    """`python -m data_gen.testing.stub_server --latency 0.2`: serve until killed; prints the base URL."""
    import argparse

    parser = argparse.ArgumentParser(description="OpenAI-compatible stub server on 127.0.0.1 (for tests)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each chat request takes")
    parser.add_argument("--api-key", help="accept only this key (others get 401)")
    args = parser.parse_args(argv)
    server = StubServer(latency=args.latency, api_key=args.api_key).start()
    print(server.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
