"""ControlPlane: the bootstrap admin key printed on first start only, authentication with scopes,
admission reserving the worst case at the default price, refusal over the month's limit, settling
once, and no rate limits for the unlimited operator and local organisations."""

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from tokenforge.config import ControlConfig
from tokenforge.control import audit, keys, limits, organizations
from tokenforge.control.errors import AuthenticationError, PermissionDeniedError, QuotaExceededError
from tokenforge.control.metering import Usage
from tokenforge.control.plane import ControlPlane
from tokenforge.control.pricing import ModelFacts, Price, PriceBook
from tokenforge.control.rate_limits import StoreRateLimiter
from tokenforge.control.store.models import Budget, RateCounter, Reservation, UsageRecord
from tokenforge.control.tiers import TierLadder

SMALL_MODEL = ModelFacts("m", 135_000_000)  # in the default "< 4B" bucket: $0.10 in and out, $0.05 cached


def make_plane(store) -> ControlPlane:
    return ControlPlane(store, PriceBook.default(), TierLadder.default(), StoreRateLimiter(store))


def make_key(plane: ControlPlane, org_name: str, scopes=("inference",)) -> str:
    with plane.store.transaction() as db:
        org = organizations.find_by_name(db, org_name) or organizations.create_org(db, org_name, audit.CLI,
                                                                                    plane.ladder)
        return keys.create_key(db, org.id, audit.CLI, scopes=scopes)[1]


def budget(plane: ControlPlane, org_id: str) -> tuple[int | None, int, int]:
    with plane.store.transaction() as db:
        row = db.get(Budget, (org_id, limits.month_of(datetime.now(UTC))))
        return row.limit_micros, row.spent_micros, row.reserved_micros


def test_open_prints_the_bootstrap_key_on_first_start_only(tmp_path):
    config = ControlConfig(database_url=f"sqlite:///{tmp_path / 'control.db'}")
    plane, bootstrap_key = ControlPlane.open(config)
    try:
        assert keys.KEY_PATTERN.match(bootstrap_key)
        admin = plane.authenticate(bootstrap_key, "admin")
        assert (admin.is_operator, admin.unlimited) == (True, True)
        assert plane.prices == PriceBook.default() and plane.ladder == TierLadder.default()
    finally:
        plane.close()
    again, no_key = ControlPlane.open(config)
    try:
        assert no_key is None
        assert again.authenticate(bootstrap_key, "inference").org_id == admin.org_id
    finally:
        again.close()


def test_authenticate_checks_the_scope(store):
    plane = make_plane(store)
    inference_key = make_key(plane, "acme", ("inference",))
    admin_key = make_key(plane, "acme", ("admin",))
    principal = plane.authenticate(inference_key, "inference")
    assert principal.scopes == frozenset({"inference"})
    with pytest.raises(PermissionDeniedError, match="'admin' scope"):
        plane.authenticate(inference_key, "admin")
    with pytest.raises(PermissionDeniedError, match="'inference' scope"):
        plane.authenticate(admin_key, "inference")
    assert plane.authenticate(admin_key, "admin").org_id == principal.org_id
    for presented in (None, "tf_nope", inference_key[:-1] + ("A" if inference_key[-1] != "A" else "B")):
        with pytest.raises(AuthenticationError):
            plane.authenticate(presented, "inference")


def test_admit_reserves_the_worst_case_and_settle_writes_one_record(store):
    plane = make_plane(store)
    principal = plane.authenticate(make_key(plane, "acme"), "inference")
    assert plane.count_request(principal).remaining_requests == 599  # tier 1: 600 a minute
    admission = plane.admit(principal, "req-1", SMALL_MODEL, "chat", 1_000, 2_000).result()
    metered = admission.metered
    assert metered.price == Price(input_micros=100_000, cached_input_micros=50_000, output_micros=100_000)
    assert (metered.request_id, metered.org_id, metered.key_id, metered.model, metered.endpoint) == (
        "req-1", principal.org_id, principal.key_id, "m", "chat")
    # Worst case: (1000 prompt + 2000 completion) x $0.10 per million = 300 micros, of tier 1's $50.
    assert budget(plane, principal.org_id) == (50_000_000, 0, 300)
    assert admission.rate_limit.remaining_tokens == 1_000_000 - 3_000
    # 600 uncached x 0.10 + 400 cached x 0.05 + 150 out x 0.10 = 60 + 20 + 15 = 95 micros
    assert plane.settle(metered, Usage(1_000, 400, 150), "ok").result() == 95
    assert plane.settle(metered, Usage(1_000, 400, 150), "ok").result() is None
    assert budget(plane, principal.org_id) == (50_000_000, 95, 0)
    with store.transaction() as db:
        assert db.scalars(select(UsageRecord.cost_micros)).all() == [95]


def test_admit_over_the_limit_is_refused(store):
    plane = make_plane(store)
    key = make_key(plane, "acme")
    with store.transaction() as db:
        acme = organizations.find_by_name(db, "acme").id
        organizations.set_custom_limit(db, acme, 250, audit.CLI, plane.ladder)
    principal = plane.authenticate(key, "inference")
    with pytest.raises(QuotaExceededError):
        plane.admit(principal, "req-1", SMALL_MODEL, "chat", 1_000, 2_000).result()  # 300 > 250 micros
    assert budget(plane, acme) == (250, 0, 0)
    plane.admit(principal, "req-2", SMALL_MODEL, "chat", 1_000, 1_500).result()  # 250 micros: fits exactly
    with pytest.raises(QuotaExceededError):
        plane.admit(principal, "req-3", SMALL_MODEL, "chat", 1, 0).result()  # 0.1 micros, rounded up to 1
    assert budget(plane, acme) == (250, 0, 250)
    with store.transaction() as db:
        assert db.scalars(select(Reservation.request_id)).all() == ["req-2"]


def test_unlimited_principals_have_no_rate_limits(store):
    plane = make_plane(store)
    with store.transaction() as db:
        bootstrap_key = organizations.ensure_operator(db, plane.ladder)
    operator = plane.authenticate(bootstrap_key, "inference")
    local = plane.local_principal()
    for principal in (operator, local):
        assert principal.unlimited
        assert plane.count_request(principal) is None
        # 20M tokens: 20 times tier 1's tokens a minute, $2 at the default price.
        admission = plane.admit(principal, f"req-{principal.org_id}", SMALL_MODEL, "chat", 10_000_000,
                                10_000_000).result()
        assert admission.rate_limit is None
        assert budget(plane, principal.org_id) == (None, 0, 2_000_000)
    with store.transaction() as db:
        assert db.scalar(select(func.count()).select_from(RateCounter)) == 0
