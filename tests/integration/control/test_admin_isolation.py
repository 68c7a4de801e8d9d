"""One organisation's admin can never read or change another's keys, usage, invoices or data;
only the operator's admins create organisations, change limits, close months and record payments."""

from datetime import UTC, datetime

import pytest

from tests.integration.control.conftest import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def two_orgs(sqlite_control_server):
    """Orgs A and B, each with an admin key and some billed usage; B's month closed into an invoice."""
    server = sqlite_control_server
    orgs = {}
    for name in ("org-a", "org-b"):
        org_id, key = server.new_org(name, scopes=("inference", "admin"))
        with server.client(key) as client:
            client.post("/v1/chat/completions", json=CHAT).raise_for_status()
        orgs[name] = (org_id, key)
    with server.admin() as admin:
        month = datetime.now(UTC).strftime("%Y-%m")
        closed = admin.post("/v1/invoices/close", json={"month": month, "organization": orgs["org-b"][0],
                                                         "include_current": True}).raise_for_status()
    return orgs, closed.json()["data"][0]["id"]


def test_foreign_organisation_is_out_of_reach(sqlite_control_server, two_orgs):
    orgs, invoice_b = two_orgs
    a_id, a_key = orgs["org-a"]
    b_id, b_key = orgs["org-b"]
    with sqlite_control_server.client(b_key) as b:
        b_key_id = b.get("/v1/keys").raise_for_status().json()["data"][0]["id"]
    with sqlite_control_server.client(a_key) as a:
        for path in ("/v1/usage", "/v1/keys", "/v1/invoices", "/v1/audit"):
            assert a.get(path, params={"organization": b_id}).status_code == 403, path
            mine = a.get(path).raise_for_status().json()
            assert b_id not in str(mine) and b_key_id not in str(mine), path
        assert a.get(f"/v1/organizations/{b_id}").status_code == 404
        assert a.get(f"/v1/invoices/{invoice_b}").status_code == 404
        assert a.delete(f"/v1/keys/{b_key_id}").status_code == 404
        assert a.post(f"/v1/organizations/{b_id}/delete-data").status_code == 404
        assert a.post("/v1/keys", json={"organization": b_id}).status_code == 403
        assert [o["id"] for o in a.get("/v1/organizations").json()["data"]] == [a_id]
    with sqlite_control_server.client(b_key) as b:  # B is untouched
        assert b.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert b.get(f"/v1/invoices/{invoice_b}").status_code == 200
        assert b.get("/v1/usage").json()["totals"]["num_requests"] >= 1


def test_operator_only_routes(sqlite_control_server, two_orgs):
    orgs, invoice_b = two_orgs
    a_id, a_key = orgs["org-a"]
    month = datetime.now(UTC).strftime("%Y-%m")
    with sqlite_control_server.client(a_key) as a:
        assert a.post("/v1/organizations", json={"name": "sneaky"}).status_code == 403
        assert a.patch(f"/v1/organizations/{a_id}", json={"monthly_limit_micros": 10**12}).status_code == 403
        assert a.post("/v1/invoices/close", json={"month": month, "include_current": True}).status_code == 403
        assert a.post(f"/v1/invoices/{invoice_b}/pay").status_code == 403
    with sqlite_control_server.admin() as operator:
        names = {o["name"] for o in operator.get("/v1/organizations").json()["data"]}
        assert {"org-a", "org-b", "operator"} <= names
        assert operator.get("/v1/usage", params={"organization": a_id}).json()["totals"]["num_requests"] >= 1


def test_invoice_renderings_and_payment(sqlite_control_server, two_orgs):
    orgs, invoice_b = two_orgs
    with sqlite_control_server.admin() as operator:
        invoice = operator.get(f"/v1/invoices/{invoice_b}").raise_for_status().json()
        text = operator.get(f"/v1/invoices/{invoice_b}", params={"format": "text"}).raise_for_status().text
        csv_text = operator.get(f"/v1/invoices/{invoice_b}", params={"format": "csv"}).raise_for_status().text
        paid = operator.post(f"/v1/invoices/{invoice_b}/pay").raise_for_status().json()
        again = operator.post(f"/v1/invoices/{invoice_b}/pay").raise_for_status().json()
        org_b = operator.get(f"/v1/organizations/{orgs['org-b'][0]}").json()
    assert invoice["total_micros"] > 0 and MODEL in text and MODEL in csv_text
    assert paid["status"] == again["status"] == "paid"
    assert org_b["paid_micros"] == invoice["total_micros"]  # paid once, counted once
