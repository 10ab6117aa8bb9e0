"""Every subcommand turns a user's mistake into one `llava-kit CMD: error: ...` line and exit code 2, never a
traceback; a bug (any other exception) keeps its traceback and exits 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llava_kit import cli
from llava_kit.cli import main

REPO = Path(__file__).resolve().parents[2]


# case -> (the command as the error names it, its arguments; {tmp} is a fresh directory holding `a_file`)
CASES = {
    "train-missing-config": ("train", ["train", "{tmp}/missing.yaml"]),
    "train-override-typo": ("train", ["train", "configs/tiny/pretrain.yaml", "trian.max_steps=3"]),
    "train-missing-llm": ("train", ["train", "configs/tiny/pretrain.yaml", "model.llm.name_or_path=/nonexistent/llm",
                                    "output_dir={tmp}/run"]),
    "serve-port": ("serve", ["serve", "--model", "{tmp}", "--port", "99999"]),
    "serve-max-images": ("serve", ["serve", "--model", "{tmp}", "--max-images", "0"]),
    "serve-missing-model": ("serve", ["serve", "--model", "/nonexistent"]),
    "chat-missing-model": ("chat", ["chat", "--model", "/nonexistent", "--prompt", "hi"]),
    "chat-bad-numbers": ("chat", ["chat", "--model", "{tmp}", "--max-new-tokens", "0", "--top-p", "2"]),
    "eval-missing-model": ("eval", ["eval", "--model", "X", "--data", "/nonexistent.jsonl", "--image-root", "/tmp"]),
    "eval-bad-limit": ("eval", ["eval", "--model", "{tmp}", "--data", "{tmp}/a_file", "--image-root", "{tmp}",
                                "--limit", "-1"]),
    "merge-missing-run": ("merge", ["merge", "/nonexistent", "-o", "{tmp}/out"]),
    "export-missing-model": ("export", ["export", "/nonexistent", "-o", "{tmp}/out"]),
    "import-missing-checkpoint": ("import", ["import", "/nonexistent", "-o", "{tmp}/out"]),
    "data-check-missing-file": ("data check", ["data", "check", "/nonexistent.json", "--image-root", "/tmp"]),
    "compare-missing-config": ("compare-projectors", ["compare-projectors", "/nonexistent.yaml"]),
    "projectors-bad-grid": ("projectors", ["projectors", "--grid", "0"]),
    "init-tiny-onto-a-file": ("init-tiny", ["init-tiny", "{tmp}/a_file"]),
}
MESSAGES = {
    "train-override-typo": "unknown key `trian`; did you mean `train`?",
    "train-missing-llm": "`model.llm.name_or_path` '/nonexistent/llm' does not exist",
    "serve-port": "--port 99999: must be from 1 to 65535",
    "serve-max-images": "--max-images 0: must be at least 1",
    "serve-missing-model": "--model '/nonexistent' does not exist",
    "chat-bad-numbers": "max_tokens must be an integer >= 1, got 0",
    "eval-missing-model": "--model 'X' does not exist",
    "eval-bad-limit": "--limit -1: must be at least 0",
    "merge-missing-run": "RUN_DIR '/nonexistent' does not exist",
    "export-missing-model": "MODEL_DIR '/nonexistent' does not exist",
    "import-missing-checkpoint": "CHECKPOINT '/nonexistent' does not exist",
    "init-tiny-onto-a-file": "a_file' is a file",
}


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line_and_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # configs/tiny/*.yaml use repo-relative paths
    (tmp_path / "a_file").write_text("not a directory")
    command, argv = CASES[case]
    capsys.readouterr()
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    prefix = f"llava-kit {command}: error: "
    assert [line.startswith(prefix) for line in err.splitlines()].count(True) == 1, err
    assert MESSAGES.get(case, "") in err


def test_eval_names_a_missing_data_file(tiny_dirs, capsys):
    assert main(["eval", "--model", str(tiny_dirs["llm"]), "--data", "/nonexistent.jsonl", "--image-root",
                 "/tmp"]) == 2
    assert "--data '/nonexistent.jsonl' does not exist" in capsys.readouterr().err


def test_a_tokenizer_that_cannot_be_loaded_is_a_user_error():
    from llava_kit.errors import LlavaKitError
    from llava_kit.model.build import load_tokenizer

    with pytest.raises(LlavaKitError, match="'/nonexistent/llm' does not exist"):
        load_tokenizer("/nonexistent/llm")


def test_a_bug_keeps_its_traceback_and_exits_1(monkeypatch):
    def broken(args):
        raise ValueError("an internal bug")  # a plain ValueError is no LlavaKitError: not the user's to fix

    monkeypatch.setattr(cli, "cmd_projectors", broken)
    with pytest.raises(ValueError, match="an internal bug"):  # in process: main lets it through
        main(["projectors"])
    code = ("import sys\nimport llava_kit.cli as cli\n"
            "def broken(args):\n    raise ValueError('an internal bug')\n"
            "cli.cmd_projectors = broken\nsys.exit(cli.main(['projectors']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: an internal bug" in result.stderr


def test_chat_takes_a_tiny_model_name_as_the_loader_does(capsys):
    """`--model tiny:llm` (a random baseline the text-sft test compares against) resolves before the existence check."""
    assert main(["chat", "--model", "tiny:llm", "--prompt", "Who are you?", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["chat", "--model", "tiny:nothing", "--prompt", "Who are you?"]) == 2
    assert "unknown tiny model 'tiny:nothing'" in capsys.readouterr().err
