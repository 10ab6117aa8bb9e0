"""Asking a benchmark's items: through the generation service (any model directory), or any OpenAI-compatible endpoint.

    answers = answer_with_service(service, items, SamplingParams(max_new_tokens=16), batch_size=32)
    answers = answer_with_endpoint("http://127.0.0.1:8000/v1", "mine", "sk-...", items, params, concurrency=8)
    answers[0].text, answers[0].error          # "Yes", None

Both ask the same prompt: the item's images, then its text (`<image>` tags first, as LLaVA asks). The endpoint gets
the images as PNG data URLs of the decoded RGB pixels, so a server sees exactly the pixels the local route
preprocesses. An item that cannot be asked or answered (an unreadable image, a prompt too long, an HTTP error)
gets its error instead of an answer: reported per item, never dropped.
"""

from __future__ import annotations

import base64
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from llava_kit.benchmarks import Item, open_image
from llava_kit.errors import LlavaKitError, UsageError
from llava_kit.inference.sampling import SamplingParams
from llava_kit.inference.service import GenerationRequest, GenerationService

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    """A model's answer to one item, or why there is none."""

    text: str = ""
    error: str | None = None


def answer_with_service(service: GenerationService, items: list[Item], params: SamplingParams,
                        batch_size: int = 32, progress: bool = True) -> list[Answer]:
    """Answer every item in a fresh conversation, `batch_size` at a time (greedy answers are those of one by one)."""
    answers: list[Answer] = []
    bar = tqdm(total=len(items), desc="eval", unit="q", dynamic_ncols=True, disable=not progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        answers_of_chunk: list[Answer] = [Answer() for _ in chunk]
        requests, asked = [], []
        for i, item in enumerate(chunk):
            try:
                prompt = service.prepare(item.messages(), [open_image(source) for source in item.images])
            except LlavaKitError as err:  # an unreadable image, a prompt over the model's positions
                answers_of_chunk[i].error = str(err)
                continue
            requests.append(GenerationRequest(prompt, params))
            asked.append(i)
        for i, completion in zip(asked, service.generate(requests) if requests else [], strict=True):
            answers_of_chunk[i].text = completion.text
        answers += answers_of_chunk
        bar.update(len(chunk))
    bar.close()
    return answers


def data_url(source) -> str:
    """A PNG data URL of an item's image, decoded to RGB first (the pixels the local route uses)."""
    buffer = io.BytesIO()
    open_image(source).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def endpoint_model(base_url: str, api_key: str) -> str:
    """The first model an OpenAI-compatible endpoint lists (GET /models)."""
    from openai import OpenAI, OpenAIError

    try:
        models = OpenAI(base_url=base_url, api_key=api_key).models.list().data
    except OpenAIError as err:
        raise UsageError(f"--base-url {base_url}: listing its models failed ({err}); check the URL (it ends in /v1) "
                         "and --api-key, or name the model with --model-name") from None
    if not models:
        raise UsageError(f"--base-url {base_url} lists no model; name one with --model-name")
    return models[0].id


def answer_with_endpoint(base_url: str, model: str, api_key: str, items: list[Item], params: SamplingParams,
                         concurrency: int = 8, progress: bool = True) -> list[Answer]:
    """Answer every item through POST /chat/completions, at most `concurrency` requests at a time (greedy:
    temperature 0)."""
    from openai import OpenAI, OpenAIError

    client = OpenAI(base_url=base_url, api_key=api_key)

    def ask(item: Item) -> Answer:
        try:
            content = [{"type": "image_url", "image_url": {"url": data_url(source)}} for source in item.images]
            content.append({"type": "text", "text": item.prompt})
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], max_tokens=params.max_new_tokens,
                temperature=params.temperature, top_p=params.top_p)
            return Answer(text=(response.choices[0].message.content or "").strip())
        except (OpenAIError, LlavaKitError) as err:
            return Answer(error=f"{type(err).__name__}: {err}")

    bar = tqdm(total=len(items), desc="eval", unit="q", dynamic_ncols=True, disable=not progress)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = []
        for answer in pool.map(ask, items):  # in item order; at most `concurrency` in flight
            answers.append(answer)
            bar.update(1)
    bar.close()
    return answers
