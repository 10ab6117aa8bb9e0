"""Fault tests train tiny runs like the integration tests: the same fixtures."""

from tests.integration.conftest import make_config  # noqa: F401 (a fixture, used by name)
