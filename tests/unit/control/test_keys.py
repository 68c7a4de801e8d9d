"""API keys on both store backends: the plaintext shown once and stored only as its sha256 hash,
authentication of live keys and refusal of missing, malformed, unknown, wrong, revoked and expired
ones, revocation scoped to an organisation, scopes, and the audit trail."""

import hashlib
import hmac
import inspect
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from tests.unit.control.helpers import make_org
from tokenforge.control import audit, keys
from tokenforge.control.errors import AuthenticationError, NotFoundError
from tokenforge.control.store.models import ApiKey, AuditEvent
from tokenforge.errors import InvalidRequestError


def make_key(store, org_id: str, actor: str = audit.CLI, **kwargs) -> tuple[keys.KeyInfo, str]:
    with store.transaction() as db:
        return keys.create_key(db, org_id, actor, **kwargs)


def authenticate(store, presented: str | None) -> keys.Principal:
    with store.transaction() as db:
        return keys.authenticate(db, presented)


def all_cells(db, model) -> list[str]:
    """Every column value of every row of `model`'s table, as text."""
    rows = db.execute(select(*model.__table__.columns)).all()
    return [str(value) for row in rows for value in row]


def test_create_shows_the_plaintext_once_and_stores_only_its_hash(store):
    acme = make_org(store, "acme")
    info, plaintext = make_key(store, acme, audit.key_actor("key_admin"), name="ci", scopes="inference admin")
    assert plaintext.startswith("tf_")
    assert keys.KEY_PATTERN.match(plaintext)
    assert len(plaintext) == 3 + 12 + 43
    secret = plaintext[3 + 12:]
    assert info.prefix == plaintext[:3 + 12]
    assert (info.org_id, info.name, info.scopes, info.revoked_at) == (acme, "ci", ("admin", "inference"), None)
    with store.transaction() as db:
        row = db.get(ApiKey, info.id)
        assert row.key_hash == hashlib.sha256(plaintext.encode()).hexdigest()
        assert row.prefix == plaintext[3:3 + 12]
        cells = all_cells(db, ApiKey) + all_cells(db, AuditEvent)
        assert not [cell for cell in cells if plaintext in cell or secret in cell]
        [event] = audit.list_events(db, acme, "key.created")
        assert (event.actor, event.target) == ("key:key_admin", info.id)
        assert event.detail["scopes"] == ["admin", "inference"]
        assert keys.list_keys(db, acme) == [info]
    assert secret not in str(info.to_dict())


def test_authenticate_a_live_key(store):
    acme = make_org(store, "acme")
    make_key(store, acme)  # another key of the same organisation is not the one found
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    info, plaintext = make_key(store, acme, scopes=["inference"], expires_at=tomorrow)
    principal = authenticate(store, plaintext)
    assert principal == keys.Principal(org_id=acme, key_id=info.id, scopes=frozenset({"inference"}),
                                       is_operator=False, unlimited=False, tier_index=1, custom_limit_micros=None)
    assert principal.actor == f"key:{info.id}"


def test_missing_malformed_unknown_and_wrong_keys_are_refused(store, monkeypatch):
    acme = make_org(store, "acme")
    _, plaintext = make_key(store, acme)
    prefix, secret = plaintext[:15], plaintext[15:]
    other_secret = secrets.token_urlsafe(32)
    refused = {
        None: "didn't provide",
        "": "didn't provide",
        "sk_" + plaintext[3:]: "not a tokenforge key",  # wrong prefix
        plaintext[:-1]: "not a tokenforge key",  # one character short
        plaintext + "A": "not a tokenforge key",  # one too many
        prefix + secret[:-1] + "!": "not a tokenforge key",  # a character no key holds
        "tf_" + plaintext[3:15].upper() + secret: "not a tokenforge key",  # the prefix is lower-case hex
        " " + plaintext: "not a tokenforge key",
        plaintext + "\n": "not a tokenforge key",  # the whole key must match: no trailing newline
        "tf_" + secrets.token_hex(6) + secret: "Incorrect API key provided.",  # right shape, unknown prefix
        prefix + other_secret: "Incorrect API key provided.",  # right prefix, wrong secret
    }
    assert len(other_secret) == 43
    compared = []
    real_compare_digest = hmac.compare_digest
    monkeypatch.setattr(keys.hmac, "compare_digest", lambda a, b: compared.append(a) or real_compare_digest(a, b))
    for presented, message in refused.items():
        with pytest.raises(AuthenticationError, match=message):
            authenticate(store, presented)
    # Only the keys of the right shape reach the comparison; an unknown prefix compares against a dummy hash.
    assert compared == ["0" * 64, keys.hash_key(plaintext)]
    assert authenticate(store, plaintext).org_id == acme


def test_revoked_and_expired_keys_are_refused(store):
    acme = make_org(store, "acme")
    revoked_info, revoked = make_key(store, acme)
    _, expired = make_key(store, acme, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    authenticate(store, revoked)
    with store.transaction() as db:
        keys.revoke_key(db, revoked_info.id, audit.CLI)
    with pytest.raises(AuthenticationError, match="revoked"):
        authenticate(store, revoked)
    with pytest.raises(AuthenticationError, match="expired"):
        authenticate(store, expired)


def test_revoke_is_idempotent_and_scoped_to_the_organization(store):
    acme, globex = make_org(store, "acme"), make_org(store, "globex")
    info, _ = make_key(store, acme)
    with store.transaction() as db:
        with pytest.raises(NotFoundError):
            keys.revoke_key(db, info.id, audit.CLI, org_id=globex)
        with pytest.raises(NotFoundError):
            keys.revoke_key(db, "key_unknown", audit.CLI)
    with store.transaction() as db:
        assert db.get(ApiKey, info.id).revoked_at is None  # the foreign attempt changed nothing
        first = keys.revoke_key(db, info.id, "key:key_admin", org_id=acme)
    with store.transaction() as db:
        again = keys.revoke_key(db, info.id, audit.CLI)
        assert first.revoked_at is not None and again.revoked_at == first.revoked_at
        [event] = audit.list_events(db, acme, "key.revoked")
        assert (event.actor, event.target) == ("key:key_admin", info.id)


def test_create_refuses_bad_scopes_unknown_orgs_and_naive_expiry(store):
    acme = make_org(store, "acme")
    with store.transaction() as db:
        for scopes in ("", [], "admin root", ("inference", "write")):
            with pytest.raises(InvalidRequestError, match="scopes"):
                keys.create_key(db, acme, audit.CLI, scopes=scopes)
        with pytest.raises(NotFoundError):
            keys.create_key(db, "org_unknown", audit.CLI)
        with pytest.raises(InvalidRequestError, match="time zone"):
            keys.create_key(db, acme, audit.CLI, expires_at=datetime(2030, 1, 1))
    with store.transaction() as db:
        assert keys.list_keys(db) == []


@pytest.mark.parametrize("scopes, parsed", [
    ("inference", ("inference",)),
    ("admin inference admin", ("admin", "inference")),
    (["inference", "admin"], ("admin", "inference")),
])
def test_parse_scopes(scopes, parsed):
    assert keys.parse_scopes(scopes) == parsed


def test_the_hash_comparison_is_constant_time():
    """By construction: the hashes are compared with hmac.compare_digest, never ==."""
    source = inspect.getsource(keys.authenticate)
    assert "hmac.compare_digest(" in source
    assert "key_hash ==" not in source and "== hash_key" not in source
