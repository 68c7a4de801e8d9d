"""The reliability tests reuse the control-plane server fixtures."""

from tests.integration.control.conftest import sqlite_control_server  # noqa: F401 - a fixture
