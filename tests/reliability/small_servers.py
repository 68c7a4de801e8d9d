"""Small servers for the bad-input tests: a 256-token context and at most 8 sequences at once, so
that whatever a fuzzer or a hostile client asks for is answered in seconds on a CPU. Test modules
import the fixtures (`from tests.reliability.small_servers import small_server`)."""

import httpx
import pytest

from tests.integration.control.conftest import ControlServer, write_pricing
from tests.integration.server.conftest import RunningServer, make_server
from tokenforge.config import ControlConfig
from tokenforge.control.plane import ControlPlane

# 16 blocks of 16 tokens: max_model_len 256. 4 running + 4 waiting: n (x prompts) over 8 is a 400.
SMALL_SERVER = {"num_blocks": 16, "max_num_seqs": 4, "max_num_waiting": 4}
ERROR_FIELDS = {"message", "type", "param", "code"}


def openai_error(response: httpx.Response) -> dict:
    """The body's {"error": {...}}, checked to have exactly OpenAI's four fields and a message."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


@pytest.fixture(scope="module")
def small_server(smollm2_loaded) -> RunningServer:
    running = make_server(smollm2_loaded, **SMALL_SERVER)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def small_control_server(smollm2_loaded, tmp_path_factory) -> ControlServer:
    """A small server with keys on (SQLite store); admin_key is the operator's bootstrap key, which
    has both the admin and the inference scope."""
    tmp_dir = tmp_path_factory.mktemp("small-control")
    plane, admin_key = ControlPlane.open(ControlConfig(database_url=f"sqlite:///{tmp_dir / 'control.db'}",
                                                       pricing_path=write_pricing(tmp_dir)))
    running = make_server(smollm2_loaded, control=plane, auth_required=True, **SMALL_SERVER)
    yield ControlServer(running, plane, admin_key)
    running.stop()
    plane.close()
