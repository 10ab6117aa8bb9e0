"""`llava-kit serve` settings: one schema model, from which the command's options are derived."""

from __future__ import annotations

import pytest

from llava_kit.cli import build_parser
from llava_kit.errors import UsageError
from llava_kit.schema import check_data, parse_arguments
from llava_kit.serve.server import ServerSettings


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", "--model", "m", *argv])


def test_the_serve_options_keep_their_names_and_defaults():
    args = _serve_args()
    assert (args.host, args.port, args.api_key, args.model_name) == ("127.0.0.1", 8000, None, "")
    assert (args.max_body_mb, args.max_images, args.max_new_tokens, args.max_batch_size) == (20.0, 8, 512, 8)
    assert args.allow_remote_images is False
    settings = parse_arguments(ServerSettings, _serve_args("--port", "8080", "--max-body-mb", "0.5",
                                                           "--allow-remote-images"), model_name="shapes")
    assert settings.port == 8080 and settings.max_body_bytes == 512 * 1024 and settings.allow_remote_images
    assert settings.model_name == "shapes"


def test_bad_settings_are_reported_together_naming_the_flags():
    with pytest.raises(UsageError) as err:
        parse_arguments(ServerSettings, _serve_args("--port", "99999", "--max-images", "0", "--max-body-mb", "-1",
                                                    "--max-batch-size", "0"))
    assert str(err.value) == ("--port 99999: must be from 1 to 65535; --max-body-mb -1.0: must be a positive number; "
                              "--max-images 0: must be at least 1; --max-batch-size 0: must be at least 1")


def test_settings_in_code_are_checked_too():
    assert ServerSettings(model_name="m", max_body_mb=0.3).max_body_bytes == int(0.3 * 1024 * 1024)
    _, problems = check_data(ServerSettings, {"port": 0, "max_new_tokens": "many", "api_kye": "x"})
    assert problems[0].startswith("unknown key `api_kye`; did you mean `api_key`?")
    assert "`port` must be from 1 to 65535, got 0" in problems
    assert "`max_new_tokens` must be an integer (at least 1), got 'many'" in problems
