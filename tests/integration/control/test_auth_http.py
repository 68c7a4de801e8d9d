"""Keys on a real server: every inference route needs a live key with the inference scope (401 / 403
in OpenAI's error shape), admin routes the admin scope; health and metrics stay open; no plaintext
key reaches the database or the logs."""

import logging
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.integration.control.conftest import MODEL
from tokenforge.control import audit, keys

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
INFERENCE_ROUTES = [("POST", "/v1/chat/completions", CHAT),
                    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
                    ("GET", "/v1/models", None), ("GET", f"/v1/models/{MODEL}", None),
                    ("POST", "/tokenize", {"model": MODEL, "prompt": "hi"}),
                    ("POST", "/detokenize", {"model": MODEL, "tokens": [1, 2]})]


def call(server, method: str, path: str, body, key: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.request(method, server.base_url + path, json=body, headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error


@pytest.fixture(scope="module")
def org_keys(sqlite_control_server):
    org_id, inference_key = sqlite_control_server.new_org("auth-org")
    return org_id, inference_key, sqlite_control_server.new_key(org_id, ("admin",))


@pytest.mark.parametrize("method,path,body", INFERENCE_ROUTES)
def test_inference_routes_need_a_live_inference_key(sqlite_control_server, org_keys, method, path, body):
    org_id, inference_key, admin_only_key = org_keys
    server = sqlite_control_server
    assert call(server, method, path, body, inference_key).status_code == 200
    assert_error(call(server, method, path, body, None), 401, "invalid_api_key")
    assert_error(call(server, method, path, body, "sk-not-ours"), 401, "invalid_api_key")
    well_formed_unknown = keys.KEY_PREFIX + "0" * keys.PREFIX_LEN + "A" * keys.SECRET_LEN
    assert_error(call(server, method, path, body, well_formed_unknown), 401, "invalid_api_key")
    wrong_secret = inference_key[:-4] + ("AAAA" if not inference_key.endswith("AAAA") else "BBBB")
    assert_error(call(server, method, path, body, wrong_secret), 401, "invalid_api_key")
    assert_error(call(server, method, path, body, admin_only_key), 403, "insufficient_permissions")


def test_revoked_and_expired_keys_are_refused(sqlite_control_server, org_keys):
    server = sqlite_control_server
    org_id = org_keys[0]
    key = server.new_key(org_id)
    assert call(server, "POST", "/v1/chat/completions", CHAT, key).status_code == 200
    with server.admin() as admin:
        listed = admin.get("/v1/keys", params={"organization": org_id}).raise_for_status().json()["data"]
        key_id = next(k["id"] for k in listed if key.startswith(k["prefix"]))
        admin.delete(f"/v1/keys/{key_id}").raise_for_status()
    revoked = call(server, "POST", "/v1/chat/completions", CHAT, key)
    assert_error(revoked, 401, "invalid_api_key")
    assert "revoked" in revoked.json()["error"]["message"]
    with server.plane.store.transaction() as db:
        _, expired = keys.create_key(db, org_id, audit.CLI, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    response = call(server, "POST", "/v1/chat/completions", CHAT, expired)
    assert_error(response, 401, "invalid_api_key")
    assert "expired" in response.json()["error"]["message"]


def test_admin_routes_need_the_admin_scope(sqlite_control_server, org_keys):
    _, inference_key, admin_only_key = org_keys
    for path in ("/v1/keys", "/v1/usage", "/v1/invoices", "/v1/organizations", "/v1/audit"):
        assert_error(call(sqlite_control_server, "GET", path, None, inference_key), 403, "insufficient_permissions")
        assert_error(call(sqlite_control_server, "GET", path, None, None), 401, "invalid_api_key")
        assert call(sqlite_control_server, "GET", path, None, admin_only_key).status_code == 200


def test_health_and_metrics_need_no_key(sqlite_control_server):
    assert httpx.get(sqlite_control_server.base_url + "/health").status_code == 200
    assert httpx.get(sqlite_control_server.base_url + "/metrics").status_code == 200


def test_no_plaintext_key_in_the_database_or_logs(sqlite_control_server, caplog):
    server = sqlite_control_server
    with caplog.at_level(logging.DEBUG):
        org_id, key = server.new_org("secret-org")
        assert call(server, "POST", "/v1/chat/completions", CHAT, key).status_code == 200
        assert call(server, "POST", "/v1/chat/completions", CHAT, key[:-1] + "x").status_code == 401
    database = server.plane.store.engine.url.database
    server.plane.store.engine.dispose()  # checkpoint nothing: read the file and its WAL as they are
    secret = key[len(keys.KEY_PREFIX) + keys.PREFIX_LEN:]
    for path in (database, database + "-wal"):
        try:
            data = open(path, "rb").read()
        except FileNotFoundError:
            continue
        assert secret.encode() not in data and server.admin_key[15:].encode() not in data
    assert secret not in caplog.text and key not in caplog.text
