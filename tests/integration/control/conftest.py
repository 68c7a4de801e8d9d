"""A real server with a control plane on a fresh store (SQLite file or PostgreSQL database), auth on,
over the shared SmolLM2 weights. Prices are set high in a test price book so that costs are
visible in micro-dollars (1,000 micro-dollars per token in and out, 500 cached)."""

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.server.conftest import MODEL, RunningServer, make_server
from tests.store_helpers import fresh_database_url
from tokenforge.config import ControlConfig
from tokenforge.control.plane import ControlPlane

TEST_PRICING = f"""
[pricing.models."{MODEL}"]
input = 1000
output = 1000
cached_input = 500
"""
NUM_BLOCKS = 256


@dataclass
class ControlServer:
    running: RunningServer
    plane: ControlPlane
    admin_key: str  # the operator's bootstrap admin key

    @property
    def base_url(self) -> str:
        return self.running.base_url

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, headers={"authorization": f"Bearer {self.admin_key}"})

    def new_org(self, name: str, monthly_limit_micros: int | None = None,
                scopes: tuple[str, ...] = ("inference",)) -> tuple[str, str]:
        """Creates an organisation (and its limit) and a key with `scopes`: (org id, key)."""
        with self.admin() as admin:
            org = admin.post("/v1/organizations", json={"name": name}).raise_for_status().json()
            if monthly_limit_micros is not None:
                admin.patch(f"/v1/organizations/{org['id']}",
                            json={"monthly_limit_micros": monthly_limit_micros}).raise_for_status()
            return org["id"], self.new_key(org["id"], scopes)

    def new_key(self, org_id: str, scopes: tuple[str, ...] = ("inference",)) -> str:
        with self.admin() as admin:
            key = admin.post("/v1/keys", json={"organization": org_id, "scopes": list(scopes)})
            return key.raise_for_status().json()["key"]

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, headers={"authorization": f"Bearer {key}"})


def write_pricing(tmp_dir: Path, extra: str = "") -> Path:
    path = tmp_dir / "pricing.toml"
    path.write_text(TEST_PRICING + extra)
    return path


def open_control_server(loaded, url: str, tmp_dir: Path, extra_pricing: str = "", **options) -> ControlServer:
    plane, admin_key = ControlPlane.open(ControlConfig(database_url=url, pricing_path=write_pricing(tmp_dir, extra_pricing),
                                                       **options))
    running = make_server(loaded, control=plane, auth_required=True, num_blocks=NUM_BLOCKS)
    return ControlServer(running, plane, admin_key)


@pytest.fixture(scope="module")
def sqlite_control_server(smollm2_loaded, tmp_path_factory):
    """One control-plane server on SQLite for a whole test module (HTTP behaviour, not store logic)."""
    tmp_dir = tmp_path_factory.mktemp("control")
    server = open_control_server(smollm2_loaded, f"sqlite:///{tmp_dir / 'control.db'}", tmp_dir)
    yield server
    server.running.stop()
    server.plane.close()


@pytest.fixture
def control_server(smollm2_loaded, store_backend, tmp_path):
    """A fresh control-plane server per test, on each store backend."""
    with fresh_database_url(store_backend, tmp_path) as url:
        server = open_control_server(smollm2_loaded, url, tmp_path)
        try:
            yield server
        finally:
            server.running.stop()
            server.plane.close()
