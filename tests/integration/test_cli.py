"""The command line as a user runs it: help texts, init-tiny, data check, clear errors, chat --prompt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava_kit.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
SHAPES = REPO / "assets" / "shapes_small"
SUBCOMMANDS = ["demo", "init-tiny", "train", "merge", "chat", "eval", "data", "caption", "export", "serve", "import"]


def test_every_subcommand_documents_every_option():
    parser = build_parser()
    actions = parser._subparsers._group_actions[0].choices
    assert set(SUBCOMMANDS) <= set(actions)
    for name, sub in actions.items():
        parsers = [sub] + ([*sub._subparsers._group_actions[0].choices.values()] if sub._subparsers else [])
        for p in parsers:
            for action in p._actions:
                if action.dest in ("help",) or isinstance(action, type(parser._subparsers._group_actions[0])):
                    continue
                assert action.help, f"`llava-kit {name}` option {action.option_strings or action.dest} has no help"


def test_help_runs_without_importing_torch():
    code = ("import sys; from llava_kit.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "try: main(['caption', '--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "caption" in result.stdout and "--model" in result.stdout


def test_init_tiny_writes_loadable_models(tmp_path, capsys):
    from llava_kit.model.build import load_llm, load_tokenizer
    from llava_kit.model.vision import build_vision_tower

    assert main(["init-tiny", str(tmp_path)]) == 0
    tower = build_vision_tower(str(tmp_path / "vision"))
    llm = load_llm(str(tmp_path / "llm"))
    tokenizer = load_tokenizer(str(tmp_path / "llm"))
    assert tower.grid == (8, 8) and llm.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template and (tmp_path / "vision" / "preprocessor_config.json").is_file()


def test_data_check_lists_every_bad_record(tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes((SHAPES / "images/train/000000.png").read_bytes())
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "outside.png").write_bytes((SHAPES / "images/train/000001.png").read_bytes())

    def rec(image, human="<image>\nWhat shape?", answer="A circle."):
        return json.dumps({"image": image, "conversations": [{"from": "human", "value": human},
                                                             {"from": "gpt", "value": answer}]})
    lines = [rec("ok.png"), rec("missing.png"), rec("broken.png"), rec("../outside.png"),
             rec("ok.png", human="no tag"), rec("ok.png", answer=""), "{broken",
             json.dumps({"image": "ok.png", "conversations": [{"from": "alien", "value": "<image>"}]})]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert main(["data", "check", str(data), "--image-root", str(root)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "valid: 1 invalid: 7"
    text = "\n".join(out)
    for reason in ("not found", "cannot read image", "outside the image root", "`<image>` tag", "empty answer",
                   "broken JSON line", "unknown role"):
        assert reason in text, reason


def test_data_check_with_config_finds_over_long_samples(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    long = {"image": "train/000000.png",
            "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                              {"from": "gpt", "value": "A red circle. " * 200}]}
    data = tmp_path / "d.json"
    data.write_text(json.dumps([long]))
    code = main(["data", "check", str(data), "--image-root", str(SHAPES / "images"),
                 "--config", "configs/tiny/sft.yaml"])
    out = capsys.readouterr().out
    assert code == 1 and "over-long sample" in out and "valid: 0 invalid: 1" in out


def test_user_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: pretrain\ntrian: {}\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "did you mean `train`" in err and "Traceback" not in err
    assert main(["chat", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "neither a merged model" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_training_applies_the_bad_record_policy(make_config, tmp_path, policy):
    from llava_kit.data.dataset import BadRecordError
    from llava_kit.train.engine import train

    records = json.loads((SHAPES / "pretrain.json").read_text())[:8]
    records[2]["image"] = "train/does_not_exist.png"
    records[5]["conversations"][1]["value"] = ""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    cfg = make_config(f"bad-{policy}", **{"data.path": str(data), "data.bad_records": policy, "train.max_steps": 1})
    if policy == "error":
        with pytest.raises(BadRecordError, match="bad record"):
            train(cfg)
        return
    run_dir = train(cfg)
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["total"] == 8 and report["kept"] == 6 and report["skipped"] == 2
    reasons = " ".join(r["reason"] for r in report["skipped_records"])
    assert "not found" in reasons and "empty answer" in reasons


def test_chat_prompt_prints_only_the_answer(make_config, tmp_path):
    from llava_kit.train.engine import train

    run_dir = train(make_config("chat", stage="sft", **{"train.max_steps": 1}))
    image = SHAPES / "images/eval/000000.png"
    result = subprocess.run([sys.executable, "-m", "llava_kit.cli", "chat", "--model", str(run_dir), "--image",
                             str(image), "--prompt", "What shape is in the image?", "--max-new-tokens", "5"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) <= 1  # the answer only; logs went to stderr
    # the interactive REPL: two turns and an image switch, from stdin
    repl = subprocess.run([sys.executable, "-m", "llava_kit.cli", "chat", "--model", str(run_dir), "--image",
                           str(image), "--max-new-tokens", "3"],
                          input=f"What shape?\n/image {SHAPES / 'images/eval/000001.png'}\nAnd now?\n/exit\n",
                          capture_output=True, text=True, cwd=REPO)
    assert repl.returncode == 0, repl.stderr
    assert "image: " in repl.stderr and len(repl.stdout.splitlines()) == 2


def test_data_check_text_formats_without_and_with_a_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    chat = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Lumen."}]
    lines = [json.dumps({"messages": chat}), "{broken", json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
             json.dumps({"messages": [chat[0], {"role": "assistant", "content": "Lumen. " * 200}]})]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert main(["data", "check", str(data), "--format", "openai"]) == 1  # readers only: the long one is fine
    out = capsys.readouterr().out
    assert "valid: 2 invalid: 2" in out and "broken JSON line" in out and "unknown role 'bot'" in out
    assert main(["data", "check", str(data), "--config", "configs/tiny/text_sft_identity.yaml"]) == 1
    out = capsys.readouterr().out  # with the config's tokenizer and max_seq_len: the long one is over-long
    assert "valid: 1 invalid: 3" in out and "over-long" in out
    assert main(["data", "check", "assets/identity/lumen.jsonl", "--format", "auto"]) == 0
    assert capsys.readouterr().out.strip() == "valid: 80 invalid: 0"
