"""The fine-tuning API through the real `openai` client: uploads (OpenAI messages with data-URL images, a zip with
images) checked at once, bad files refused with OpenAI-shaped errors that say what was wrong, jobs refused before they
are queued when their request cannot train, list / retrieve / cancel / events; and (slow) a whole fine-tuning job of
a tiny model followed through its events, then chatted with by its fine_tuned_model name."""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from pathlib import Path

import openai
import pytest

from llava_kit.serve.server import ServerSettings, start_server
from llava_kit.studio import Studio
from llava_kit.studio.api import studio_router
from llava_kit.studio.models import serve_fine_tuned_models
from llava_kit.studio.settings import StudioSettings

SHAPES = Path(__file__).resolve().parents[2] / "assets" / "shapes_small"
KEY = "sk-studio"


def openai_records(count: int) -> list[dict]:
    """The first `count` shapes conversations as OpenAI fine-tuning records, each image a data URL."""
    records = []
    for record in json.loads((SHAPES / "sft.json").read_text())[:count]:
        url = "data:image/png;base64," + base64.b64encode((SHAPES / "images" / record["image"]).read_bytes()).decode()
        messages = []
        for i, turn in enumerate(record["conversations"]):
            text = turn["value"].replace("<image>\n", "")
            if turn["from"] == "human":
                content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}] \
                    if i == 0 else text
                messages.append({"role": "user", "content": content})
            else:
                messages.append({"role": "assistant", "content": text})
        records.append({"messages": messages})
    return records


def openai_pairs(count: int) -> list[dict]:
    """The first `count` shapes preference pairs in OpenAI's preference fine-tuning JSONL, each image a data URL."""
    records = []
    for pair in json.loads((SHAPES / "pairs.json").read_text())[:count]:
        url = "data:image/png;base64," + base64.b64encode((SHAPES / "images" / pair["images"][0]).read_bytes()).decode()
        question = pair["conversations"][0]["value"].replace("<image>\n", "")
        records.append({"input": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]},
            "preferred_output": [{"role": "assistant", "content": pair["chosen"]["value"]}],
            "non_preferred_output": [{"role": "assistant", "content": pair["rejected"]["value"]}]})
    return records


def jsonl(records: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    studio = Studio(tmp_path_factory.mktemp("studio")).start(poll_s=0.1)
    yield studio
    studio.close(cancel_running=True)


@pytest.fixture(scope="module")
def client(studio):
    settings = ServerSettings(api_key=KEY, max_new_tokens=8)
    server = start_server({}, settings, port=0, routers=[studio_router(studio, StudioSettings(max_upload_mb=1))],
                          setup=lambda app: serve_fine_tuned_models(studio, app.state.workers, settings))
    yield openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
    server.shutdown()


@pytest.fixture(scope="module")
def training_file(client):
    return client.files.create(file=("shapes.jsonl", jsonl(openai_records(16))), purpose="fine-tune")


@pytest.fixture(scope="module")
def preference_file(client):
    return client.files.create(file=("pairs.jsonl", jsonl(openai_pairs(8))), purpose="fine-tune")


def refused(call, status: int = 400) -> dict:
    """The OpenAI error body of a call that must fail with `status`."""
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    assert caught.value.status_code == status, caught.value.body
    return caught.value.body


# ---------------------------------------------------------------------------------------------- files

def test_an_upload_with_data_url_images_is_checked_and_kept(client, training_file):
    assert training_file.object == "file" and training_file.status == "processed"
    assert training_file.filename == "shapes.jsonl" and training_file.bytes == len(jsonl(openai_records(16)))
    assert client.files.retrieve(training_file.id).id == training_file.id
    assert training_file.id in [f.id for f in client.files.list().data]
    assert client.files.content(training_file.id).content == jsonl(openai_records(16))


def test_a_zip_of_llava_json_and_images_is_extracted_and_checked(client):
    records = json.loads((SHAPES / "sft.json").read_text())[:3]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data/train.json", json.dumps(records))
        for record in records:
            z.write(SHAPES / "images" / record["image"], f"data/{record['image']}")
    upload = client.files.create(file=("shapes.zip", archive.getvalue()), purpose="fine-tune")
    assert upload.status == "processed"


@pytest.mark.parametrize(("name", "content", "says"), [
    ("broken.jsonl", jsonl(openai_records(1)) + b'{"messages": [\n',
     "1 of 2 records cannot be trained on: broken.jsonl:2: broken JSON line"),
    ("roles.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"}]}]),
     "roles.jsonl:1: bad roles: the conversation does not end with an answer"),
    ("missing.jsonl", jsonl([{"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "photo.jpg"}}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."}]}]), "image 'photo.jpg' not found"),
    ("notes.csv", b"a,b\n", "upload a .jsonl, .json, .txt data file"),
    ("empty.jsonl", b"", "is empty"),
])
def test_a_bad_file_is_refused_with_the_reason(client, name, content, says):
    body = refused(lambda: client.files.create(file=(name, content), purpose="fine-tune"))
    assert body["code"] == "invalid_file" and body["param"] == "file" and body["type"] == "invalid_request_error"
    assert says in body["message"], body["message"]


def test_a_zip_whose_member_leaves_the_folder_is_refused(client):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../evil.jsonl", jsonl(openai_records(1)))
    body = refused(lambda: client.files.create(file=("evil.zip", archive.getvalue()), purpose="fine-tune"))
    assert "has a path that leaves the archive's folder" in body["message"]


def test_wrong_purpose_too_large_and_no_key_are_refused(client):
    body = refused(lambda: client.files.create(file=("a.jsonl", jsonl(openai_records(1))), purpose="assistants"))
    assert body["param"] == "purpose" and "purpose 'assistants' is not supported" in body["message"]
    body = refused(lambda: client.files.create(file=("big.jsonl", b" " * (3 << 20)), purpose="fine-tune"), 413)
    assert "limit of 1 MB" in body["message"]
    keyless = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    assert refused(keyless.files.list, 401)["code"] == "invalid_api_key"


# ---------------------------------------------------------------------------------------------- jobs

@pytest.mark.parametrize(("request_fields", "param", "says"), [
    ({"model": "gpt-4o-mini"}, "model", "is not a base this server knows: give a recipe (tiny-shapes"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", 'must be "auto" or an integer from 1'),
    ({"hyperparameters": {"n_epoch": 2}}, "hyperparameters.n_epoch", "Extra inputs are not permitted"),
    ({"hyperparameters": {"learning_rate_multiplier": "fast"}}, "hyperparameters.learning_rate_multiplier",
     'must be "auto" or a number above 0'),
    ({"method": {"type": "dpo"}}, "training_file", "method dpo trains on preference pairs"),
    ({"hyperparameters": {"beta": 0.2}}, "hyperparameters.beta", "is a hyperparameter of method dpo"),
    ({"method": {"type": "reinforcement"}}, "method.type", "method 'reinforcement' is not supported"),
    ({"training_file": "file-nothere"}, "training_file", "no file 'file-nothere' on this server"),
    ({"suffix": "my model"}, "suffix", "suffix must be 1 to 64 letters"),
    ({"model": "tiny-text"}, "training_file", "records have images, and this base is a text-only model"),
])
def test_a_job_that_cannot_train_is_refused_before_it_is_queued(client, studio, training_file, request_fields,
                                                                param, says):
    before = len(studio.store.jobs())
    fields = {"model": "tiny-shapes", "training_file": training_file.id, **request_fields}
    body = refused(lambda: client.fine_tuning.jobs.create(**fields))
    assert body["param"] == param and says in body["message"], body
    assert len(studio.store.jobs()) == before


def test_a_job_is_listed_retrieved_and_cancelled(client, training_file):
    job = client.fine_tuning.jobs.create(model="tiny-shapes", training_file=training_file.id,
                                         hyperparameters={"n_epochs": 500, "batch_size": 4,
                                                          "learning_rate_multiplier": 0.5}, suffix="long")
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")
    assert job.hyperparameters.n_epochs == 500 and job.hyperparameters.batch_size == 4
    assert job.method.type == "supervised" and job.user_provided_suffix == "long"
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=100).data]
    deadline = time.monotonic() + 120
    while client.fine_tuning.jobs.retrieve(job.id).status != "running":
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.1)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None and cancelled.error is None
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert messages[0] == "Job cancelled; its process is being stopped" and messages[-1].startswith("Job created")
    body = refused(lambda: client.fine_tuning.jobs.cancel(job.id))
    assert "has already cancelled" in body["message"]
    assert refused(lambda: client.fine_tuning.jobs.retrieve("ftjob-nothere"), 404)["code"] == "job_not_found"


def test_a_dpo_job_is_created_from_uploaded_pairs_and_refused_where_it_cannot_train(client, studio, training_file,
                                                                                    preference_file):
    assert preference_file.status == "processed"
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}}
    for fields, param, says in (
            ({"model": "tiny-shapes-pretrain"}, "model", "this base trains stage pretrain (the projector alone)"),
            ({"method": {"type": "supervised"}}, "training_file", "the file holds preference pairs"),
            ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}}, "method.dpo.hyperparameters.beta",
             'must be "auto" or a number above 0')):
        request = {"model": "tiny-shapes", "training_file": preference_file.id, "method": dpo, **fields}
        body = refused(lambda request=request: client.fine_tuning.jobs.create(**request))
        assert body["param"] == param and says in body["message"], body
    job = client.fine_tuning.jobs.create(model="tiny-shapes", training_file=preference_file.id, method=dpo)
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.hyperparameters.n_epochs == 1
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # (the slow test below runs one to its end)


# ---------------------------------------------------------------------------------------------- a whole job

@pytest.mark.slow
def test_a_tiny_model_is_fine_tuned_followed_and_chatted_with(client, training_file):
    job = client.fine_tuning.jobs.create(model="tiny-shapes", training_file=training_file.id,
                                         hyperparameters={"n_epochs": 1, "batch_size": 8}, seed=7)
    seen, deadline = {}, time.monotonic() + 600
    while True:  # follow the events as a client does: the newest page, then anything not yet seen
        job = client.fine_tuning.jobs.retrieve(job.id)
        for event in client.fine_tuning.jobs.list_events(job.id, limit=50):  # auto-paginates (after=...)
            seen.setdefault(event.id, event)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"still {job.status}"
        time.sleep(0.5)
    assert job.status == "succeeded", job.error
    story = [e.message for e in sorted(seen.values(), key=lambda e: int(e.id.removeprefix("ftevent-")))]
    assert story[0] == "Job created: fine-tune tiny-shapes" and story[1] == "Job started"
    assert [m.split(":")[0] for m in story if m.startswith("Step ") and "loss" in m] == ["Step 1/2", "Step 2/2"]
    assert story[-2:] == [f"New fine-tuned model created: {job.fine_tuned_model}", "The job has successfully completed"]
    assert job.fine_tuned_model == f"ft:tiny-shapes:{job.id}" and job.trained_tokens > 0 and job.seed == 7

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints[0].fine_tuned_model_checkpoint == job.fine_tuned_model and checkpoints[0].step_number == 2
    results = client.files.content(job.result_files[0]).text.splitlines()
    assert results[0] == "step,train_loss,learning_rate,epoch" and len(results) == 3

    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    answer = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": openai_records(1)[0]["messages"][0]["content"][0]["image_url"]["url"]}},
        {"type": "text", "text": "What shape is in the image?"}]}])
    assert answer.model == job.fine_tuned_model and answer.usage.completion_tokens >= 1


@pytest.mark.slow
def test_a_dpo_job_is_followed_to_its_model_and_chatted_with(client, preference_file):
    job = client.fine_tuning.jobs.create(model="tiny-shapes", training_file=preference_file.id, seed=1, method={
        "type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "beta": 0.5}}})
    deadline = time.monotonic() + 600
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"still {job.status}"
        time.sleep(0.5)
    assert job.status == "succeeded", job.error
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert [m.split(":")[0] for m in events if m.startswith("Step ") and "loss" in m] == ["Step 2/2", "Step 1/2"]
    results = client.files.content(job.result_files[0]).text.splitlines()
    assert results[0].startswith("step,train_loss") and len(results) == 3
    url = openai_pairs(1)[0]["input"]["messages"][0]["content"][0]["image_url"]["url"]
    answer = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, messages=[{"role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe the image."}]}])
    assert answer.model == job.fine_tuned_model and answer.usage.completion_tokens >= 1
