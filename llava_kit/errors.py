"""The one error base: `LlavaKitError` is every error a user can cause and fix.

    raise ConfigError([...])                 # a config problem (llava_kit/config.py)
    raise PathNotFoundError("data file 'x.json' does not exist; ...")

The CLI catches `LlavaKitError` only: it prints the message (what was wrong, what was expected, how to fix
it) and exits with code 2. Any other exception is a bug in llava-kit or a library and shows its traceback
(exit 1). So raise a `LlavaKitError` subclass for bad input (configs, paths, data, arguments, model
directories) and let everything else propagate.

`LlavaKitError` is a `ValueError`, so code that catches `ValueError` for bad input (a record reader that
turns a bad record into a reported skip, a test) keeps working. The subclasses below say *what* the user has
to fix; modules keep their own subclasses (`VisionTowerError`, `ProjectorError`, `ExportError`, ...) where a
caller wants to catch that kind alone.
"""

from __future__ import annotations


class LlavaKitError(ValueError):
    """Something the user caused and can fix; the message says what was wrong and how to fix it."""


class ConfigError(LlavaKitError):
    """One or more problems in a configuration (a YAML file, overrides, options); the message lists all of them."""

    def __init__(self, problems: list[str] | str, source: str = "config"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


class PathNotFoundError(LlavaKitError, FileNotFoundError):
    """A file or directory the user named does not exist (also a FileNotFoundError)."""


class DataError(LlavaKitError):
    """A data file, record or image that cannot be used as it is.

    `kind` names the reason in a few stable words (`over-long`, `unknown role`, `image not found`): data reports
    count skipped records by it, while the message keeps the record's details. Without one the message is the kind.
    """

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind or message


class RecordError(DataError):
    """One record that cannot become a training sample; the message is the reason reported for it."""


class ModelLoadError(LlavaKitError):
    """A model directory, checkpoint or hub id that cannot be opened as asked."""


class UsageError(LlavaKitError):
    """A command-line argument or API argument outside what is accepted."""


class ExportError(LlavaKitError):
    """The model cannot be written in the requested format; the message says why and what to do instead."""
