"""TierLadder: the default ladder, tier_for at each threshold, get by index, bad configs naming their
key, and a user TOML file replacing the ladder."""

import copy

import pytest

from tokenforge.control.pricing import read_control_document
from tokenforge.control.settings import load_control_toml
from tokenforge.control.tiers import Tier, TierLadder
from tokenforge.errors import ConfigError

DOLLAR = 1_000_000


@pytest.fixture(scope="module")
def ladder() -> TierLadder:
    return TierLadder.default()


def test_default_ladder(ladder):
    assert ladder.tiers == (
        Tier(1, "tier-1", 0, 50 * DOLLAR, 600, 1_000_000),
        Tier(2, "tier-2", 50 * DOLLAR, 500 * DOLLAR, 1_200, 2_000_000),
        Tier(3, "tier-3", 500 * DOLLAR, 5_000 * DOLLAR, 3_000, 5_000_000),
        Tier(4, "tier-4", 5_000 * DOLLAR, 50_000 * DOLLAR, 6_000, 10_000_000),
    )


@pytest.mark.parametrize("paid_micros, index", [
    (0, 1), (1, 1), (50 * DOLLAR - 1, 1), (50 * DOLLAR, 2), (50 * DOLLAR + 1, 2), (500 * DOLLAR - 1, 2),
    (500 * DOLLAR, 3), (5_000 * DOLLAR - 1, 3), (5_000 * DOLLAR, 4), (10**15, 4),
])
def test_tier_for_at_the_thresholds(ladder, paid_micros, index):
    assert ladder.tier_for(paid_micros).index == index


@pytest.mark.parametrize("paid_micros", [-1, 1.5, True])
def test_tier_for_rejects_bad_amounts(ladder, paid_micros):
    with pytest.raises(ValueError):
        ladder.tier_for(paid_micros)


def test_get(ladder):
    assert [ladder.get(i).name for i in (1, 2, 3, 4)] == ["tier-1", "tier-2", "tier-3", "tier-4"]
    for index in (0, 5, -1):
        with pytest.raises(ConfigError, match=f"no usage tier {index}"):
            ladder.get(index)


def test_user_file_replaces_the_ladder_and_keeps_the_prices(tmp_path):
    path = tmp_path / "control.toml"
    path.write_text("[[tiers]]\nmin_paid = 0\nmonthly_limit = 10.5\nrequests_per_minute = 60\n"
                    "tokens_per_minute = 100_000\n"
                    '[[tiers]]\nname = "gold"\nmin_paid_micros = 1_000\nmonthly_limit_micros = 7\n'
                    "requests_per_minute = 120\ntokens_per_minute = 200_000\n")
    ladder = TierLadder.from_toml(path)
    assert ladder.tiers == (Tier(1, "tier-1", 0, 10_500_000, 60, 100_000), Tier(2, "gold", 1_000, 7, 120, 200_000))
    assert ladder.tier_for(999).index == 1 and ladder.tier_for(1_000).name == "gold"
    book, same_ladder = load_control_toml(path)
    assert same_ladder == ladder
    assert [bucket.max_params for bucket in book.dense] == [4_000_000_000, 16_000_000_000, None]


def _with(change):
    data = copy.deepcopy(read_control_document())
    change(data["tiers"])
    return data


@pytest.mark.parametrize("change, key", [
    (lambda t: t[0].update(min_paid=1), "tiers[0].min_paid must be 0"),
    (lambda t: t[2].update(min_paid=50), "tiers[2].min_paid"),
    (lambda t: t[1].update(min_paid=5_000), "tiers[2].min_paid"),
    (lambda t: t[1].update(monthly_limit=0), "tiers[1].monthly_limit must be above 0"),
    (lambda t: t[1].update(monthly_limit=-5), "tiers[1].monthly_limit"),
    (lambda t: t[1].update(monthly_limit="lots"), "tiers[1].monthly_limit"),
    (lambda t: t[3].update(requests_per_minute=0), "tiers[3].requests_per_minute"),
    (lambda t: t[3].update(tokens_per_minute=1.5), "tiers[3].tokens_per_minute"),
    (lambda t: t[3].pop("tokens_per_minute"), "tiers[3].tokens_per_minute is missing"),
    (lambda t: t[0].pop("min_paid"), "tiers[0].min_paid is missing"),
    (lambda t: t[1].pop("monthly_limit"), "tiers[1].monthly_limit is missing"),
    (lambda t: t[1].update(min_paid_micros=1), "tiers[1]: give min_paid or min_paid_micros"),
    (lambda t: t[1].update(monthly_limt=5), "tiers[1]: unknown key 'monthly_limt'"),
    (lambda t: t[1].update(name="tier-1"), "tiers[1].name"),
    (lambda t: t[1].update(name=""), "tiers[1].name"),
    (lambda t: t.clear(), "tiers must be one or more"),
])
def test_bad_config_names_the_key(change, key):
    with pytest.raises(ConfigError) as info:
        TierLadder.from_dict(_with(change))
    assert key in str(info.value)


def test_from_dict_fills_in_no_defaults():
    with pytest.raises(ConfigError, match="tiers"):
        TierLadder.from_dict({})


def test_constructor_checks_the_ladder():
    first = Tier(1, "tier-1", 0, 1, 1, 1)
    assert TierLadder([first]).tiers == (first,)
    with pytest.raises(ConfigError, match="tiers"):
        TierLadder(())
    with pytest.raises(ConfigError, match=r"tiers\[1\].index"):
        TierLadder((first, Tier(3, "tier-3", 10, 1, 1, 1)))
