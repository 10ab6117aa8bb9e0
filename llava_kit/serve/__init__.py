"""Front-ends over the generation service: the terminal chat and the OpenAI-compatible server.

- `chat.py`      `llava-kit chat`: the terminal REPL around a ChatSession
- `settings.py`  ServerSettings: what `serve` (and `webui`) can be told; the CLI options derive from it
- `protocol.py`  the OpenAI chat-completions API as pydantic models; errors in OpenAI's shape
- `requests.py`  a request -> llava-kit messages, images and SamplingParams, or a 400 saying what to fix
- `worker.py`    one model worker per model: a bounded queue, batching, cancellation
- `app.py`       the FastAPI app: routes, key, body limits, error handlers (it takes more routers)
- `server.py`    models -> workers -> app -> uvicorn; `start_server` runs it in a thread (tests)
"""
