"""API keys: random, shown once, stored only as a sha256 hash found by a public prefix, compared
in constant time, with expiry, revocation and scopes (inference, admin).

A key reads `tf_<12 hex prefix><43 url-safe secret chars>` (256 random bits). The hash is
unsalted sha256: salting and stretching protect low-entropy passwords, not random 256-bit keys.
"""

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from tokenforge.control import audit
from tokenforge.control.errors import AuthenticationError, NotFoundError
from tokenforge.control.store.models import ApiKey, Organization
from tokenforge.errors import InvalidRequestError

KEY_PREFIX = "tf_"
PREFIX_LEN = 12  # hex chars after "tf_": the public, indexed part
SECRET_LEN = 43  # secrets.token_urlsafe(32)
KEY_PATTERN = re.compile(rf"^{KEY_PREFIX}[0-9a-f]{{{PREFIX_LEN}}}[A-Za-z0-9_-]{{{SECRET_LEN}}}$")
SCOPES = frozenset({"inference", "admin"})

# Every request's lookup, built once: the key by its prefix, with what its principal needs of its org.
_keys, _orgs = ApiKey.__table__.c, Organization.__table__.c
_FIND_KEY = (select(_keys.id.label("key_id"), _keys.key_hash, _keys.scopes, _keys.expires_at, _keys.revoked_at,
                    _orgs.id, _orgs.is_operator, _orgs.unlimited, _orgs.tier_index, _orgs.custom_limit_micros)
             .join_from(ApiKey.__table__, Organization.__table__, _keys.org_id == _orgs.id)
             .where(_keys.prefix == bindparam("prefix")))


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: an organisation, the key it used (None when auth is off), its scopes,
    and what its limits depend on (read with the key, once per request)."""

    org_id: str
    key_id: str | None
    scopes: frozenset[str]
    is_operator: bool = False
    unlimited: bool = False
    tier_index: int = 1
    custom_limit_micros: int | None = None

    @property
    def actor(self) -> str:
        return audit.key_actor(self.key_id) if self.key_id else audit.SYSTEM


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: never its secret or hash."""

    id: str
    org_id: str
    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def to_dict(self) -> dict:
        def iso(t):
            return None if t is None else t.isoformat()
        return {"id": self.id, "object": "api_key", "organization": self.org_id, "name": self.name,
                "prefix": self.prefix, "scopes": list(self.scopes), "created_at": iso(self.created_at),
                "expires_at": iso(self.expires_at), "revoked_at": iso(self.revoked_at)}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(12)}"


def parse_scopes(scopes) -> tuple[str, ...]:
    values = scopes.split() if isinstance(scopes, str) else list(scopes)
    unknown = set(values) - SCOPES
    if not values or unknown:
        raise InvalidRequestError(f"scopes must be a non-empty subset of {sorted(SCOPES)}, got {values}",
                                  param="scopes")
    return tuple(sorted(set(values)))


def create_key(db: Session, org_id: str, actor: str, name: str = "", scopes=("inference",),
               expires_at: datetime | None = None) -> tuple[KeyInfo, str]:
    """A new key of `org_id`: (its info, the plaintext key, which is never stored or shown again)."""
    scope_list = parse_scopes(scopes)
    if db.get(Organization, org_id) is None:
        raise NotFoundError(f"no organization {org_id}", param="organization")
    if expires_at is not None and expires_at.tzinfo is None:
        raise InvalidRequestError("expires_at needs a time zone", param="expires_at")
    prefix = secrets.token_hex(PREFIX_LEN // 2)
    plaintext = f"{KEY_PREFIX}{prefix}{secrets.token_urlsafe(32)}"
    row = ApiKey(id=new_id("key"), org_id=org_id, name=name, prefix=prefix, key_hash=hash_key(plaintext),
                 scopes=" ".join(scope_list), created_at=datetime.now(UTC), expires_at=expires_at)
    db.add(row)
    audit.record(db, actor, "key.created", org_id, row.id, name=name, scopes=list(scope_list),
                 expires_at=expires_at)
    return _info(row), plaintext


def authenticate(db: Session, presented: str | None) -> Principal:
    """The principal of a presented key; AuthenticationError (401) for anything not a live key."""
    if not presented:
        raise AuthenticationError("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
    if not KEY_PATTERN.fullmatch(presented):
        raise AuthenticationError("Incorrect API key provided: it is not a tokenforge key.")
    row = db.execute(_FIND_KEY, {"prefix": presented[len(KEY_PREFIX):][:PREFIX_LEN]}).first()
    # Hash and compare even when no row matched, so both paths cost the same.
    expected = row.key_hash if row is not None else "0" * 64
    if not hmac.compare_digest(expected, hash_key(presented)) or row is None:
        raise AuthenticationError("Incorrect API key provided.")
    now = datetime.now(UTC)
    if row.revoked_at is not None:
        raise AuthenticationError("This API key has been revoked.")
    if row.expires_at is not None and row.expires_at <= now:
        raise AuthenticationError("This API key has expired.")
    return principal_of(row, row.key_id, frozenset(row.scopes.split()))


def principal_of(org, key_id: str | None, scopes: frozenset[str]) -> Principal:
    """`org`: the Organization, or a row with its id and limit columns."""
    return Principal(org_id=org.id, key_id=key_id, scopes=scopes, is_operator=org.is_operator,
                     unlimited=org.unlimited, tier_index=org.tier_index, custom_limit_micros=org.custom_limit_micros)


def revoke_key(db: Session, key_id: str, actor: str, org_id: str | None = None) -> KeyInfo:
    """Revokes a key (of `org_id` when given: a foreign key is 'not found'). Idempotent."""
    row = db.get(ApiKey, key_id)
    if row is None or (org_id is not None and row.org_id != org_id):
        raise NotFoundError(f"no API key {key_id}", param="key")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        audit.record(db, actor, "key.revoked", row.org_id, row.id)
    return _info(row)


def list_keys(db: Session, org_id: str | None = None) -> list[KeyInfo]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if org_id is not None:
        query = query.where(ApiKey.org_id == org_id)
    return [_info(row) for row in db.scalars(query)]


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.org_id, row.name, KEY_PREFIX + row.prefix, tuple(row.scopes.split()),
                   row.created_at, row.expires_at, row.revoked_at)
