"""The studio's parts that need no training: OpenAI's hyperparameters as run-config keys, bases, data fitting a stage,
the Train page's form, safe zip extraction, the growing set of served models, and `llava-kit jobs`."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import pytest

from llava_kit import cli
from llava_kit.config import STAGES, config_from_dict
from llava_kit.schema import load_yaml_file
from llava_kit.studio import JobRecord, Store, Studio
from llava_kit.studio.files import UploadError, extract_zip, inspect_data, safe_filename
from llava_kit.studio.recipes import (
    FineTuneError,
    apply_hyperparameters,
    check_data_fits,
    configs_dir,
    fine_tune_config,
    method_stage,
    resolve_base,
)
from llava_kit.webui.train_form import STAGE_DEFAULTS, config_from_form, form_from_config

SHAPES = Path(__file__).resolve().parents[2] / "assets" / "shapes_small"


# ---------------------------------------------------------------------------------------------- recipes

def test_hyperparameters_become_run_config_keys():
    train = {"micro_batch_size": 8, "max_steps": 30, "learning_rate": 1e-3, "projector_learning_rate": 2e-3}
    echoed = apply_hyperparameters(train, {"n_epochs": 3, "batch_size": 12, "learning_rate_multiplier": 0.5})
    assert train == {"micro_batch_size": 6, "gradient_accumulation_steps": 2, "max_steps": -1, "num_epochs": 3,
                     "learning_rate": 5e-4, "projector_learning_rate": 1e-3}
    assert echoed == {"n_epochs": 3, "batch_size": 12, "learning_rate_multiplier": 0.5}
    train = {"micro_batch_size": 8, "max_steps": 30, "learning_rate": 1e-3}
    assert apply_hyperparameters(train, {"batch_size": 7}) == {"n_epochs": "auto", "batch_size": 7,
                                                               "learning_rate_multiplier": 1.0}
    assert (train["micro_batch_size"], train["gradient_accumulation_steps"]) == (7, 1)
    unchanged = {"micro_batch_size": 4, "num_epochs": 2, "learning_rate": 1e-4}
    assert apply_hyperparameters(unchanged, {}) == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert unchanged == {"micro_batch_size": 4, "num_epochs": 2, "learning_rate": 1e-4}


def test_a_recipe_base_drops_its_data_and_what_is_not_here():
    base = resolve_base("llava-1.5-7b", fine_tuned={})
    assert "path" not in base.config["data"] and "image_root" not in base.config["data"]
    assert base.config["model"]["init_from"] is None and "is not here" in base.notes[0]
    assert base.config["train"]["deepspeed"] == str(configs_dir() / "deepspeed" / "zero3.json")
    with pytest.raises(FineTuneError, match="give a recipe .*tiny-shapes.* a fine-tuned model \\(none yet\\)"):
        resolve_base("gpt-4o", fine_tuned={})


def test_a_run_directory_as_a_base_is_refused_with_the_merge_command(tmp_path):
    (tmp_path / "config.yaml").write_text("stage: sft\n")
    with pytest.raises(FineTuneError, match="is a run directory; merge it first"):
        resolve_base(str(tmp_path), fine_tuned={})


def test_method_dpo_trains_the_preference_stage_of_the_base():
    assert method_stage("supervised", "sft") == "sft"
    assert method_stage("dpo", "sft") == "dpo" and method_stage("dpo", "text-sft") == "text-dpo"
    with pytest.raises(FineTuneError, match=r"this base trains stage pretrain \(the projector alone\).*tiny-shapes"):
        method_stage("dpo", "pretrain")
    with pytest.raises(FineTuneError, match=r"method 'ppo' is not supported"):
        method_stage("ppo", "sft")


def test_a_dpo_job_config_freezes_the_projector_and_sets_beta(tmp_path):
    base = resolve_base("tiny-shapes", fine_tuned={})
    config, echoed = fine_tune_config(base, "dpo", {"n_epochs": 1, "beta": 0.25}, str(SHAPES / "pairs.json"),
                                      str(SHAPES / "images"), str(tmp_path / "run"), seed=3)
    assert echoed == {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1.0, "beta": 0.25}
    cfg = config_from_dict(config)  # the whole run config, checked as `llava-kit train` checks it
    assert cfg.stage == "dpo" and cfg.train.preference.beta == 0.25 and cfg.train.projector_learning_rate is None
    assert (cfg.model.trainable.projector, cfg.model.trainable.llm, cfg.data.packing) == ("frozen", "lora", False)
    text = resolve_base("tiny-text", fine_tuned={})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"question": "Who are you?", "chosen": "A helper.", "rejected": "A rock."}) + "\n")
    config, echoed = fine_tune_config(text, "dpo", {}, str(pairs), "", str(tmp_path / "text"), seed=None)
    assert config_from_dict(config).stage == "text-dpo" and echoed["beta"] == 0.1  # the loss's default


@pytest.mark.parametrize(("summary", "stage", "says"), [
    ({"kind": "text", "formats": {"text": 3}}, "sft", "holds raw text"),
    ({"kind": "conversations", "formats": {"llava": 3}}, "text-pt", "trains stage text-pt on raw text"),
    ({"kind": "conversations", "formats": {"openai": 3}, "with_images": 2}, "text-sft", "2 records have images"),
    ({"kind": "conversations", "formats": {"moss": 3}}, "sft", "stage sft does not read moss records"),
    ({"kind": "conversations", "formats": {"llava": 3}}, "dpo", "method dpo trains on preference pairs"),
    ({"kind": "preference", "formats": {"pairwise": 3}}, "sft", "the file holds preference pairs.*method dpo"),
    ({"kind": "preference", "formats": {"pairwise": 3}, "with_images": 3}, "text-dpo", "3 records have images"),
])
def test_data_a_stage_cannot_train_on_is_refused(summary, stage, says):
    with pytest.raises(FineTuneError, match=says):
        check_data_fits(summary, stage, "training_file")
    check_data_fits({"kind": "conversations", "formats": {"llava": 3}, "with_images": 3}, "sft", "training_file")
    check_data_fits({"kind": "preference", "formats": {"pairwise": 3}, "with_images": 3}, "dpo", "training_file")


# ---------------------------------------------------------------------------------------------- the Train page's form

def test_the_train_form_round_trips_a_recipe_into_a_valid_config(tmp_path):
    values = form_from_config(load_yaml_file(configs_dir() / "tiny" / "pretrain.yaml"))
    assert values["stage"] == "pretrain" and values["vision"] == "tiny:vision" and values["llm_trainable"] == "frozen"
    assert Path(values["data_path"]).is_file()  # named from the source tree, found from anywhere
    values.update(max_steps=4.0, lora_r=8.0, deepspeed="zero2")  # the page's numbers are floats
    config = config_from_form(values)
    assert config["train"]["max_steps"] == 4 and config["model"]["lora"]["r"] == 8
    assert config["train"]["deepspeed"].endswith("deepspeed/zero2.json")
    cfg = config_from_dict({**config, "output_dir": str(tmp_path / "run")})
    assert cfg.stage == "pretrain" and cfg.data.path == values["data_path"]

    text = form_from_config(load_yaml_file(configs_dir() / "tiny" / "text_sft_identity.yaml"))
    config = config_from_form(text)
    assert "vision" not in config["model"] and "image_root" not in config["data"]
    assert config_from_dict({**config, "output_dir": str(tmp_path / "text")}).stage == "text-sft"

    dpo = form_from_config(load_yaml_file(configs_dir() / "tiny" / "dpo.yaml"))
    dpo["projector_learning_rate"] = 1e-3  # the page's field; a dpo run's projector stays frozen
    cfg = config_from_dict({**config_from_form(dpo), "output_dir": str(tmp_path / "dpo")})
    assert cfg.stage == "dpo" and cfg.model.trainable.projector == "frozen" and cfg.train.projector_learning_rate is None


def test_every_stage_has_the_train_pages_defaults():
    assert set(STAGE_DEFAULTS) == set(STAGES)


# ---------------------------------------------------------------------------------------------- files

def zip_of(members: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return archive


@pytest.mark.parametrize(("members", "links", "says"), [
    ({"../x.jsonl": b"{}"}, (), "leaves the archive's folder"),
    ({"/abs/x.jsonl": b"{}"}, (), "leaves the archive's folder"),
    ({"a/../../x.jsonl": b"{}"}, (), "leaves the archive's folder"),
    ({"data.jsonl": b"{}"}, ("img.png",), "is a symbolic link"),
    ({"a.jsonl": b"{}", "b.json": b"[]"}, (), "exactly one data file .* found: a.jsonl, b.json"),
    ({"img.png": b"x"}, (), "found: none"),
    ({"data.jsonl": b"x" * 5000}, (), "expands past"),
])
def test_a_zip_is_extracted_only_inside_its_folder_and_within_limits(tmp_path, members, links, says):
    path = tmp_path / "upload.zip"
    path.write_bytes(zip_of(members, links).getvalue())
    with pytest.raises(UploadError, match=says):
        extract_zip(path, tmp_path / "out", max_bytes=4096)
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path.parent / "x.jsonl").exists()


def test_a_zip_with_its_data_in_a_folder_and_macos_metadata_extracts(tmp_path):
    path = tmp_path / "upload.zip"
    path.write_bytes(zip_of({"set/data.jsonl": b"{}", "__MACOSX/set/._data.jsonl": b"junk",
                             "set/.DS_Store": b"junk"}).getvalue())
    assert extract_zip(path, tmp_path / "out", max_bytes=4096) == tmp_path / "out" / "set" / "data.jsonl"


def test_upload_names_are_made_safe_and_text_data_is_recognised(tmp_path):
    assert safe_filename("../../etc/pass wd.jsonl") == "pass_wd.jsonl"
    assert safe_filename("C:\\data\\.hidden.json") == "hidden.json" and safe_filename("..") == "upload"
    text = tmp_path / "corpus.jsonl"
    text.write_text(json.dumps({"text": "Once upon a time."}) + "\n" + json.dumps({"text": "The end."}) + "\n")
    summary = inspect_data(text)
    assert (summary.kind, summary.records, summary.formats) == ("text", 2, {"text": 2})
    conversations = inspect_data(SHAPES / "sft.json", SHAPES / "images")
    assert conversations.kind == "conversations" and conversations.records == conversations.with_images == 48
    assert conversations.preview[0]["messages"][0]["content"].startswith("<image>\n")
    pairs = inspect_data(SHAPES / "pairs.json", SHAPES / "images")
    assert (pairs.kind, pairs.records, pairs.with_images, pairs.formats) == ("preference", 48, 48, {"pairwise": 48})
    first = json.loads((SHAPES / "pairs.json").read_text())[0]
    assert pairs.preview[0]["chosen"] == first["chosen"]["value"] and pairs.preview[0]["rejected"] == first[
        "rejected"]["value"]
    from llava_kit.webui.studio_pages import _preview_markdown  # the Train page shows the prompt and both answers

    assert f"assistant (chosen): {first['chosen']['value']}\nassistant (rejected): {first['rejected']['value']}" in \
        _preview_markdown(pairs.preview)
    broken = tmp_path / "pairs.jsonl"
    broken.write_text(json.dumps({"question": "Which?", "chosen": "A.", "rejected": "A."}) + "\n")
    assert inspect_data(broken).problems == ["pairs.jsonl:1: the chosen and rejected answers are the same text: "
                                             "nothing to prefer"]


# ---------------------------------------------------------------------------------------------- served models

def test_model_workers_grow_while_iterating_reads_a_snapshot():
    from llava_kit.serve.worker import ModelWorkers

    class Fake:
        def __init__(self, name):
            self.name = name

    workers = ModelWorkers({"a": Fake("a")})
    names = iter(workers)
    assert workers.add(Fake("b")) and not workers.add(Fake("b"))
    assert list(names) == ["a"] and list(workers) == ["a", "b"] and len(workers) == 2


def test_a_server_without_models_answers_404_and_lists_the_studio_routes(tmp_path):
    from fastapi.testclient import TestClient

    from llava_kit.serve.app import create_app
    from llava_kit.serve.server import ModelWorkers, ServerSettings
    from llava_kit.studio.api import studio_router
    from llava_kit.studio.settings import StudioSettings

    studio = Studio(tmp_path / "studio")
    app = create_app(ModelWorkers(), ServerSettings(), routers=[studio_router(studio, StudioSettings())])
    client = TestClient(app)
    answer = client.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    assert "no model yet" in answer.json()["error"]["message"]
    unknown = client.get("/v1/nothing").json()["error"]["message"]
    assert "POST /v1/fine_tuning/jobs" in unknown and "POST /v1/chat/completions" in unknown
    assert client.get("/v1/fine_tuning/jobs").json() == {"object": "list", "data": [], "has_more": False,
                                                         "first_id": None, "last_id": None}
    assert client.post("/v1/fine_tuning/jobs", content=b"{").json()["error"]["code"] == "invalid_json"
    body = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-shapes"}).json()["error"]
    assert body["param"] == "training_file" and "Field required" in body["message"]
    assert client.post("/v1/files", content=b"x").status_code == 400  # not multipart: no `file`


# ---------------------------------------------------------------------------------------------- the CLI

def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_jobs_list_show_and_cancel_from_the_command_line(tmp_path, capsys):
    studio = Studio(tmp_path / "studio")  # no server: the job stays queued
    job = studio.submit(JobRecord(id=Store.new_id("job"), kind="merge", label="mine", steps=[["merge", "r", "-o", "m"]]))
    code, out, _ = run_cli(capsys, "jobs", "list", "--studio", str(studio.root))
    assert code == 0 and out.splitlines()[0].split() == ["id", "kind", "status", "step", "loss", "label", "model",
                                                         "created"]
    assert out.splitlines()[1].split()[:4] == [job.id, "merge", "queued", "mine"]
    code, out, _ = run_cli(capsys, "jobs", "show", job.id, "--studio", str(studio.root))
    assert code == 0 and f"id: {job.id}" in out and "step 1: llava-kit merge r -o m" in out
    assert "Job created: merge mine" in out
    code, out, _ = run_cli(capsys, "jobs", "cancel", job.id, "--studio", str(studio.root))
    assert (code, out.strip()) == (0, f"{job.id}: cancelled")
    code, _, err = run_cli(capsys, "jobs", "cancel", job.id, "--studio", str(studio.root))
    assert code == 2 and "has already cancelled" in err
    code, _, err = run_cli(capsys, "jobs", "show", "job-nothere", "--studio", str(studio.root))
    assert code == 2 and "no job 'job-nothere'" in err
    code, _, err = run_cli(capsys, "jobs", "list", "--studio", str(tmp_path / "nowhere"))
    assert code == 2 and "no studio in" in err
    code, _, err = run_cli(capsys, "serve")
    assert code == 2 and "give the model(s) to serve (--model DIR), or --studio" in err


def test_any_llava_kit_command_can_be_queued_as_a_job(tmp_path, capsys, monkeypatch):
    from llava_kit.errors import UsageError

    studio = Studio(tmp_path / "studio")
    with pytest.raises(UsageError, match="one of the llava-kit commands train, merge, export"):
        studio.submit_command(["rm", "-rf", "/"])
    config = tmp_path / "cfg.yaml"
    config.write_text((configs_dir() / "tiny" / "pretrain.yaml").read_text().replace(
        "assets/", str(configs_dir().parent / "assets") + "/"))
    job = studio.submit_command(["train", "cfg.yaml", "output_dir=runs/mine"], cwd=tmp_path)
    assert (job.kind, job.label, job.cwd) == ("train", "mine", str(tmp_path))
    assert job.run_dir == str(tmp_path / "runs" / "mine") and job.params["fine_tuned_model"] == f"ft:mine:{job.id}"
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "jobs", "submit", "--studio", str(studio.root), "--", "eval", "--model", "m",
                           "--data", "q.jsonl", "--image-root", "img")
    queued = studio.store.job(out.strip())
    assert code == 0 and queued.steps == [["eval", "--model", "m", "--data", "q.jsonl", "--image-root", "img"]]
    assert queued.cwd == str(tmp_path) and queued.status == "queued"


def test_a_lazy_service_answers_with_the_loaded_services_own_methods(tmp_path, monkeypatch):
    from llava_kit.studio import models

    class Loaded:
        def encode(self, messages, n_images=0, image_sizes=None):  # the worker passes each image's size (AnyRes)
            return [len(messages), n_images, len(image_sizes or ())]

    monkeypatch.setattr(models, "reads_images", lambda path: True)
    lazy = models.LazyService(tmp_path)
    lazy._service = Loaded()  # as if its directory had been opened
    assert lazy.supports_images and lazy.encode([{"role": "user"}], 1, [(32, 64)]) == [1, 1, 1]
    with pytest.raises(AttributeError):
        _ = lazy.no_such_method
