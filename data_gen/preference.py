"""`llava-kit caption --task preference`: preference pairs for DPO from your own model, judged by a vision API.

RLAIF-V's recipe, at small scale: for each image a question is asked of the model being improved (any OpenAI-
compatible endpoint, usually `llava-kit serve`) several times at a sampling temperature; the vision API then sees
the image, the question and the distinct answers, scores each for what it gets right and wrong about the image
(hallucinated objects, attributes, counts and text weigh most), and names the best and the worst. Each image gives
one record in the RLAIF-V layout that `train stage=dpo` reads (docs/preference.md):

    {"id": "...-preference", "image": "cats/01.jpg", "question": "Describe the image in detail.",
     "chosen": "...", "rejected": "...", "scores": [8, 3, 6], "samples": [...], "judge_reason": "...", ...}

Everything else is the caption run's (data_gen/run.py): the same scan, resume by image hash, output lock,
retries with backoff, errors file with a reason for every image that did not make it, rate limit (`--rpm` counts
one judged attempt, i.e. one judge request), Ctrl-C and kill -9 safety. An attempt whose samples cannot be judged
(fewer than two distinct usable answers) or whose verdict names no preference (a tie, best = worst) is retried like
an unusable caption (`--validation-retries`) and then recorded as failed with that reason.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from data_gen.client import ClientOptions, FatalAPIError, TransientError, VisionClient
from data_gen.prompts import JUDGE_INSTRUCTION, AnswerError, Task, _find_json
from data_gen.validate import check_finish, check_turns

if TYPE_CHECKING:
    from data_gen.run import Job
    from data_gen.scan import ImageFile

SAMPLER_KEY_ENV = "SAMPLER_API_KEY"
"""Environment variable with the sampler endpoint's key (`--sampler-api-key-env`); unset: the placeholder EMPTY."""


@dataclass
class SamplerOptions:
    """The endpoint whose answers are judged, and how its answers are drawn."""

    base_url: str
    """OpenAI-compatible endpoint ending in /v1 (`llava-kit serve` prints it)."""
    model: str
    """Model name as that endpoint knows it."""
    samples: int = 4
    """Answers drawn per image (at least 2; duplicates are judged once)."""
    temperature: float = 1.0
    """Sampling temperature: high enough that the answers differ."""
    max_tokens: int = 256
    """Completion budget of one answer."""
    timeout: float = 120.0


def sample_task(question: str, max_tokens: int) -> Task:
    """The question as a plain-text request to the sampled model (no rules, no JSON: it answers as a user sees)."""
    return Task(name="sample", instruction=question, schema={}, shape="", max_tokens=max_tokens,
                expected_output_tokens=max_tokens // 2, raw=True)


def judge_task(base: Task, question: str, answers: list[str]) -> Task:
    """The preference task with one image's question and candidate answers filled into the judge's prompt."""
    listed = "\n\n".join(f"Answer {i}: {answer}" for i, answer in enumerate(answers, 1))
    return replace(base, instruction=JUDGE_INSTRUCTION.format(n=len(answers), question=question, answers=listed),
                   raw=True)  # raw: the instruction already asks for the JSON shape; the caption RULES do not apply


@dataclass
class Verdict:
    """The judge's reading of the candidates: 0-based best and worst, a score per answer, and why."""

    best: int
    worst: int
    scores: list[int]
    reason: str


def parse_verdict(text: str, count: int) -> Verdict:
    """The judge's JSON answer as a Verdict; AnswerError `malformed_json` or `no_preference` when unusable."""
    obj = _find_json(text)
    if not isinstance(obj, dict):
        raise AnswerError("malformed_json", f"the judge's answer is not a JSON object: {text.strip()[:80]!r}")
    best, worst, scores = obj.get("best"), obj.get("worst"), obj.get("scores")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (best, worst)):
        raise AnswerError("malformed_json", "the judge's `best` and `worst` must be answer numbers")
    if not (1 <= best <= count and 1 <= worst <= count):
        raise AnswerError("malformed_json", f"the judge named answer {best} / {worst} of {count}")
    if (not isinstance(scores, list) or len(scores) != count
            or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores)):
        raise AnswerError("malformed_json", f"the judge's `scores` must be {count} numbers, got {scores!r}"[:200])
    if best == worst or scores[best - 1] <= scores[worst - 1]:
        raise AnswerError("no_preference", f"the judge prefers no answer (best {best}, worst {worst}, scores "
                                           f"{scores})")
    reason = obj.get("reason") if isinstance(obj.get("reason"), str) else ""
    return Verdict(best - 1, worst - 1, [int(s) for s in scores], reason.strip())


def distinct_answers(texts: list[str]) -> list[str]:
    """The usable sampled answers, each once, in the order drawn (unusable ones: refusals, empty, leaks)."""
    kept: list[str] = []
    for text in texts:
        try:
            check_turns([("", text)])
        except AnswerError:
            continue
        if text not in kept:
            kept.append(text)
    return kept


def preference_question(job: Job, img: ImageFile) -> str:
    """The question asked about an image: drawn per image with the seed from the task's list (or --prompt-file's
    lines), so a rerun asks the same one."""
    questions = job.task.questions
    digest = hashlib.sha256(f"{job.options.seed}:{img.sha256}".encode()).digest()
    return questions[int.from_bytes(digest[:8], "big") % len(questions)]


class PreferenceRequester:
    """One judged attempt per call: sample the answers, have them judged, store the pair (Job.accept_pair)."""

    def __init__(self, job: Job, judge: VisionClient, sampler: SamplerOptions, sampler_key: str) -> None:
        self.job = job
        self.judge = judge
        self.options = sampler
        self.sampler = VisionClient(
            ClientOptions(model=sampler.model, base_url=sampler.base_url, timeout=sampler.timeout,
                          detail=judge.options.detail, response_format="text", max_tokens=sampler.max_tokens,
                          temperature=sampler.temperature), sampler_key, SAMPLER_KEY_ENV)

    async def __call__(self, img: ImageFile, image_url: str) -> None:
        question = preference_question(self.job, img)
        answers = distinct_answers(await self._sample(question, image_url))
        if len(answers) < 2:
            raise AnswerError("identical_samples", f"{len(answers)} distinct usable answer(s) of "
                                                   f"{self.options.samples} drawn: raise --sampler-temperature")
        reply = await self.judge.complete(judge_task(self.job.task, question, answers), image_url)
        verdict = parse_verdict(check_finish(reply.finish_reason, reply.refusal, reply.content), len(answers))
        self.job.accept_pair(img, {
            "question": question, "chosen": answers[verdict.best], "rejected": answers[verdict.worst],
            "scores": verdict.scores, "samples": answers, "judge_reason": verdict.reason,
            "sampler": self.options.model})

    async def _sample(self, question: str, image_url: str) -> list[str]:
        """`samples` answers drawn at once; a failure of any one fails the attempt (retried as a whole)."""
        task = sample_task(question, self.options.max_tokens)
        results = await asyncio.gather(*(self.sampler.complete(task, image_url) for _ in range(self.options.samples)),
                                       return_exceptions=True)
        for result in results:  # a fatal error first: retrying cannot help
            if isinstance(result, FatalAPIError):
                raise FatalAPIError(f"the sampler: {result}")
        for result in results:
            if isinstance(result, TransientError):
                raise TransientError(f"sampler_{result.reason}", result.detail, result.retry_after)
            if isinstance(result, BaseException):
                raise result
        texts = []
        for reply in results:
            try:
                texts.append(check_finish(reply.finish_reason, reply.refusal, reply.content).strip())
            except AnswerError:
                continue  # an unusable sample is dropped; too few left fails the attempt above
        return texts

    def unreachable(self, exc: TransientError) -> tuple[str, str] | None:
        """(the endpoint, its option) when an error shows it was never reached (no request to it succeeded)."""
        if exc.reason in ("sampler_connection_error", "sampler_timeout") and self.sampler.successes == 0:
            return f"the sampler at {self.options.base_url}", "--sampler-base-url"
        if exc.reason in ("connection_error", "timeout") and self.judge.successes == 0:
            return self.judge.options.base_url or "api.openai.com", "--base-url"
        return None

    async def close(self) -> None:
        await self.sampler.close()

    @property
    def sampler_tokens(self) -> tuple[int, int]:
        return self.sampler.prompt_tokens, self.sampler.completion_tokens
