"""`tokenforge keys | orgs | usage | invoices` run in-process against a SQLite file in a temp data dir:
a key is printed once and never stored in plaintext; usage as CSV; invoices closed, shown and paid."""

import csv
import io
import json
import re
import uuid
from datetime import UTC, datetime

import pytest

from tokenforge.cli.main import main
from tokenforge.control import audit, invoices, limits, metering, organizations
from tokenforge.control.metering import MeteredRequest, Usage
from tokenforge.control.pricing import Price
from tokenforge.control.store.db import open_store

PRICE = Price(input_micros=10_000_000, cached_input_micros=5_000_000, output_micros=20_000_000)  # $10/$5/$20 per 1M


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENFORGE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TOKENFORGE_DATABASE_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # rich tables as wide as the ids
    return tmp_path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def spend(url: str, org_id: str, used: Usage, now: datetime) -> int:
    """One metered request, written as the server writes it."""
    store = open_store(url)
    try:
        with store.transaction() as db:
            request_id = f"req-{uuid.uuid4().hex}"
            month = limits.reserve(db, org_id, request_id, PRICE.worst_case_micros(used.num_prompt_tokens,
                                   used.num_completion_tokens), None, ttl_s=900, now=now)
            req = MeteredRequest(request_id, org_id, None, "smollm2", "chat", PRICE, month, now)
            return metering.write_usage(db, req, used, "ok", now=now)
    finally:
        store.close()


def org_id_of(url: str, name: str) -> str:
    store = open_store(url)
    try:
        with store.transaction() as db:
            return organizations.find_by_name(db, name).id
    finally:
        store.close()


def test_keys_are_shown_once_and_stored_hashed(data_dir, capsys):
    assert cli(capsys, "orgs", "create", "acme")[0] == 0
    status, out, err = cli(capsys, "keys", "create", "--org", "acme", "--name", "ci", "--scopes", "inference",
                           "admin", "--expires-in-days", "30")
    assert status == 0
    key = out.strip()
    assert re.fullmatch(r"tf_[0-9a-f]{12}[A-Za-z0-9_-]{43}", key)
    assert "not shown again" in err
    key_id = re.search(r"key_[0-9a-f]+", err).group(0)
    # Neither the key nor its secret part is anywhere in the database files (WAL included).
    files = list(data_dir.glob("tokenforge.db*"))
    assert files and all(key.encode() not in f.read_bytes() and key[15:].encode() not in f.read_bytes()
                         for f in files)

    status, out, _ = cli(capsys, "keys", "list", "--org", "acme")
    assert status == 0 and key_id in out and key[:15] in out and key not in out and "active" in out
    assert cli(capsys, "keys", "revoke", key_id)[0] == 0
    status, out, _ = cli(capsys, "keys", "list")
    assert status == 0 and "revoked" in out and "active" not in out

    status, _, err = cli(capsys, "keys", "create", "--org", "nobody")
    assert status == 1 and "no organization named 'nobody'" in err
    status, _, err = cli(capsys, "keys", "create", "--org", "acme", "--scopes", "root")
    assert status == 1 and "scopes" in err


def test_orgs(data_dir, capsys):
    status, out, _ = cli(capsys, "orgs", "create", "acme")
    assert status == 0 and "tier 1" in out and "$50.00" in out
    assert cli(capsys, "orgs", "create", "acme")[0] == 1  # the name is taken
    status, out, _ = cli(capsys, "orgs", "set-limit", "acme", "--monthly-limit", "99.50")
    assert status == 0 and "$99.50 (custom)" in out
    status, out, _ = cli(capsys, "orgs", "list")
    assert status == 0 and "acme" in out and "$99.50" in out and "custom limit" in out
    status, out, _ = cli(capsys, "orgs", "set-limit", "acme", "--tier-default")
    assert status == 0 and "$50.00 (tier 1)" in out
    assert cli(capsys, "orgs", "set-limit", "acme", "--monthly-limit", "0.0000001")[0] == 1
    status, _, err = cli(capsys, "orgs", "delete-data", "acme")
    assert status == 1 and "--yes" in err
    assert cli(capsys, "keys", "create", "--org", "acme")[0] == 0
    status, out, _ = cli(capsys, "orgs", "delete-data", "acme", "--yes")
    assert status == 0 and "1 keys" in out
    assert "acme" in cli(capsys, "orgs", "list")[1]  # the organisation itself stays


def test_usage_and_invoices(data_dir, capsys):
    url = f"sqlite:///{data_dir / 'tokenforge.db'}"
    assert cli(capsys, "orgs", "create", "acme")[0] == 0
    acme = org_id_of(url, "acme")
    # 900 x $10 + 100 cached x $5 + 2000 x $20 per 1M = 9000 + 500 + 40000 = 49,500 micros
    assert spend(url, acme, Usage(1000, 100, 2000), datetime(2025, 1, 31, 23, 59, 59, tzinfo=UTC)) == 49_500
    # 1000 x $10 per 1M = 10,000 micros, in February
    assert spend(url, acme, Usage(1000, 0, 0), datetime(2025, 2, 1, tzinfo=UTC)) == 10_000

    status, out, _ = cli(capsys, "usage", "--org", "acme", "--start", "2025-01-01", "--end", "2025-02-28", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert status == 0 and [(r["day"], r["cost_micros"], r["num_cached_tokens"]) for r in rows] == [
        ("2025-01-31", "49500", "100"), ("2025-02-01", "10000", "0")]
    status, out, _ = cli(capsys, "usage", "--start", "2025-01-01", "--end", "2025-01-31")
    assert status == 0 and "smollm2" in out and "$0.049500" in out
    status, _, err = cli(capsys, "usage", "--start", "2025-02-01", "--end", "2025-01-01")
    assert status == 1 and "after end" in err

    status, out, _ = cli(capsys, "invoices", "close", "--month", "2025-01")
    assert status == 0 and "acme" in out and "$0.049500" in out
    invoice_id = re.search(r"inv_[0-9a-f]+", out).group(0)
    assert cli(capsys, "invoices", "close", "--month", "2025-01", "--org", "acme")[1].count(invoice_id) == 1

    status, out, _ = cli(capsys, "invoices", "show", invoice_id, "--format", "json")
    data = json.loads(out)
    assert status == 0 and (data["total_micros"], data["status"], len(data["lines"])) == (49_500, "open", 1)
    status, out, _ = cli(capsys, "invoices", "show", invoice_id, "--format", "csv")
    assert status == 0 and list(csv.DictReader(io.StringIO(out)))[0]["amount_micros"] == "49500"
    status, out, _ = cli(capsys, "invoices", "show", invoice_id)
    assert status == 0 and "acme" in out and "cached input" in out and out.rstrip().endswith("$0.049500")

    status, out, _ = cli(capsys, "invoices", "pay", invoice_id)
    assert status == 0 and "is paid" in out
    assert cli(capsys, "invoices", "pay", invoice_id)[0] == 0  # again: counted once
    store = open_store(url)
    try:
        with store.transaction() as db:
            assert organizations.get_org(db, acme).paid_micros == 49_500
            assert invoices.get_invoice(db, invoice_id).status == "paid"
            assert len(audit.list_events(db, acme, "invoice.paid")) == 1
    finally:
        store.close()
    status, out, _ = cli(capsys, "invoices", "list", "--org", "acme")
    assert status == 0 and invoice_id in out and "paid" in out

    status, _, err = cli(capsys, "invoices", "show", "inv_missing")
    assert status == 1 and "no invoice inv_missing" in err
    status, _, err = cli(capsys, "invoices", "close", "--month", "2999-01")
    assert status == 1 and "not ended" in err


def test_database_url_and_pricing_options(data_dir, tmp_path, capsys):
    other = tmp_path / "other" / "control.db"
    pricing = tmp_path / "pricing.toml"
    pricing.write_text('[[tiers]]\nmin_paid = 0\nmonthly_limit = 7\nrequests_per_minute = 1\n'
                       'tokens_per_minute = 1\n')
    status, out, _ = cli(capsys, "orgs", "create", "elsewhere", "--database-url", f"sqlite:///{other}",
                         "--pricing", str(pricing))
    assert status == 0 and "$7.00" in out and other.exists()
    assert "elsewhere" in cli(capsys, "orgs", "list", "--database-url", f"sqlite:///{other}")[1]
    assert "elsewhere" not in cli(capsys, "orgs", "list")[1]  # the data dir's own store

