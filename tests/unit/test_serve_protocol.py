"""The server's request checks without a server: pydantic errors name the parameter, `--model [NAME=]DIR` names,
and the web chat's conversation bookkeeping."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llava_kit.cli import main
from llava_kit.errors import UsageError
from llava_kit.serve.protocol import ChatCompletionRequest, public_message, validation_error
from llava_kit.serve.settings import parse_models


def problem(raw: str):
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate_json(raw)
    return validation_error(err.value)


def test_validation_errors_are_400s_naming_the_parameter():
    hi = '"messages": [{"role": "user", "content": "hi"}]'
    cases = {'{"temperature": NaN, ' + hi + "}": "temperature", '{"top_p": 1.5, ' + hi + "}": "top_p",
             '{"max_tokens": 0, ' + hi + "}": "max_tokens", '{"stop": [1], ' + hi + "}": "stop",
             '{"stream": "true", ' + hi + "}": "stream", '{"messages": []}': "messages",
             '{"messages": [{"role": "robot", "content": "hi"}]}': "messages[0].role",
             '{"messages": [{"content": "hi"}, {"role": "user"}]}': "messages[0].role"}
    for raw, param in cases.items():
        error = problem(raw)
        assert (error.status, error.param) == (400, param) and error.message.startswith(f"{param}: "), raw
    for raw in ("[1, 2]", '"x"'):
        assert problem(raw).message == "the request body must be a JSON object with `messages` (and `model`)"
    deep = problem('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert deep.code == "invalid_json" and "recursion limit" in deep.message


def test_unknown_fields_are_ignored_and_types_are_strict():
    body = ChatCompletionRequest.model_validate_json(
        '{"messages": [{"role": "user", "content": "hi"}], "user": "x", "frequency_penalty": 0, "seed": 3}')
    assert body.seed == 3 and body.model is None
    assert problem('{"messages": [{"role": "user", "content": "hi"}], "seed": 3.0}').param == "seed"


def test_object_reprs_never_reach_a_client():
    assert public_message("cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e50>") == \
        "cannot identify image file the data"


def test_model_names_come_from_directories_or_are_given():
    assert parse_models(["runs/a/merged"]) == [("merged", "runs/a/merged")]
    assert parse_models(["runs/a/merged"], "shapes") == [("shapes", "runs/a/merged")]
    assert parse_models(["lin=runs/a/merged", "mlp=runs/b/merged"]) == [("lin", "runs/a/merged"),
                                                                         ("mlp", "runs/b/merged")]
    assert parse_models(["runs/x=1/merged"]) == [("merged", "runs/x=1/merged")]  # "=" inside a path
    with pytest.raises(UsageError, match="name each one with --model NAME=DIR"):
        parse_models(["runs/a/merged", "runs/b/merged"])
    with pytest.raises(UsageError, match="--model-name names the only model"):
        parse_models(["a=x", "b=y"], "shapes")


def test_serve_and_webui_refuse_ambiguous_names_in_one_line(capsys):
    assert main(["serve", "--model", "runs/a/merged", "--model", "runs/b/merged"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llava-kit serve: error: several models would be called 'merged'")
    assert main(["webui", "--model", "a=missing/dir"]) == 2
    assert "--model 'missing/dir' does not exist" in capsys.readouterr().err


def test_the_conversation_of_the_web_chat():
    pytest.importorskip("gradio")
    from llava_kit.webui.conversation import Turn, bubbles, messages_of, new_turn

    assert new_turn({"text": "  ", "files": []}) is None
    with pytest.raises(UsageError, match="paperclip"):
        new_turn({"text": "look: <image>", "files": []})
    first = new_turn({"text": "What shape?", "files": ["/tmp/a.png", {"path": "/tmp/b.png"}]})
    assert first == Turn("What shape?", ["/tmp/a.png", "/tmp/b.png"])
    first.answer = "A star."
    turns = [first, Turn("And the colour?"), Turn("Stopped early", answer=None), Turn("Last?")]
    turns[1].answer = "Red."
    messages, images = messages_of(turns)
    assert messages == [{"role": "user", "content": "<image>\n<image>\nWhat shape?"},
                        {"role": "assistant", "content": "A star."},
                        {"role": "user", "content": "And the colour?"}, {"role": "assistant", "content": "Red."},
                        {"role": "user", "content": "Stopped early"}, {"role": "assistant", "content": ""},
                        {"role": "user", "content": "Last?"}]
    assert images == ["/tmp/a.png", "/tmp/b.png"]
    shown = bubbles(turns[:2] + [Turn("Last?")], pending="It is")
    assert shown[:3] == [{"role": "user", "content": {"path": "/tmp/a.png"}},
                         {"role": "user", "content": {"path": "/tmp/b.png"}},
                         {"role": "user", "content": "What shape?"}]
    assert shown[-1] == {"role": "assistant", "content": "It is"}
