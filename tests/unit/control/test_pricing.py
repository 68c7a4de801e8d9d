"""PriceBook and Price: hand-computed costs per bucket, cached tokens, overrides, rounding up, the worst
case, bad configs naming their key, and a user TOML file over the defaults."""

import copy
import subprocess
import sys

import pytest

from tokenforge.control.pricing import (Bucket, ModelFacts, Price, PriceBook, dollars_to_micros, parse_num_params,
                                        read_control_document)
from tokenforge.control.settings import load_control_toml
from tokenforge.errors import ConfigError

B = 1_000_000_000
M = 1_000_000


def make_dense(num_params: int, name: str = "some-model") -> ModelFacts:
    return ModelFacts(name=name, num_params=num_params)


def make_moe(num_params: int, name: str = "some-moe") -> ModelFacts:
    return ModelFacts(name=name, num_params=num_params, is_moe=True)


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.default()


@pytest.mark.parametrize("num_params, input_micros", [
    (135 * M, 100_000), (4 * B, 100_000),  # exactly 4B is in the <= 4B bucket
    (4 * B + 1, 200_000), (8 * B, 200_000), (16 * B, 200_000),
    (16 * B + 1, 900_000), (70 * B, 900_000), (405 * B, 900_000),
])
def test_dense_buckets(book, num_params, input_micros):
    assert book.price_for(make_dense(num_params)) == Price(input_micros, input_micros // 2, input_micros)


@pytest.mark.parametrize("num_params, input_micros", [
    (47 * B, 500_000), (56 * B, 500_000), (56 * B + 1, 1_200_000), (141 * B, 1_200_000),
    (176 * B, 1_200_000), (671 * B, 1_200_000),
])
def test_moe_buckets_by_total_params(book, num_params, input_micros):
    assert book.price_for(make_moe(num_params)) == Price(input_micros, input_micros // 2, input_micros)


def test_hand_computed_costs(book):
    # 135M dense at $0.10/M: 1000 prompt + 500 completion = 1500 * 100_000 / 1M = 150 micros.
    assert book.price_for(make_dense(135 * M)).cost_micros(1000, 0, 500) == 150
    # 8B dense at $0.20/M: 1000 + 500 tokens = 300 micros.
    assert book.price_for(make_dense(8 * B)).cost_micros(1000, 0, 500) == 300
    # 70B dense at $0.90/M: 2000 + 1000 tokens = 3000 * 900_000 / 1M = 2700 micros.
    assert book.price_for(make_dense(70 * B)).cost_micros(2000, 0, 1000) == 2700
    # 47B MoE (Mixtral-sized) at $0.50/M: 2000 + 1000 tokens = 1500 micros; the same size dense is $0.90/M.
    assert book.price_for(make_moe(47 * B)).cost_micros(2000, 0, 1000) == 1500
    assert book.price_for(make_dense(47 * B)).cost_micros(2000, 0, 1000) == 2700
    # 141B MoE at $1.20/M: 1M prompt tokens = $1.20.
    assert book.price_for(make_moe(141 * B)).cost_micros(1_000_000, 0, 0) == 1_200_000


def test_cached_tokens_at_the_discount(book):
    price = book.price_for(make_dense(8 * B))  # $0.20/M input, $0.10/M cached
    # 400 uncached * 200_000 + 600 cached * 100_000 = 140_000_000 -> 140 micros.
    assert price.cost_micros(1000, 600, 0) == 140
    # All cached, plus 100 completion: 1000 * 100_000 + 100 * 200_000 = 120_000_000 -> 120 micros.
    assert price.cost_micros(1000, 1000, 100) == 120


def test_rounding_up_once_per_request():
    price = Price(input_micros=100_000, cached_input_micros=50_000, output_micros=100_000)  # $0.10/M
    assert price.cost_micros(0, 0, 0) == 0
    assert price.cost_micros(1, 0, 0) == 1  # 0.1 micro -> 1
    assert price.cost_micros(10, 0, 0) == 1  # exactly 1 micro
    assert price.cost_micros(11, 0, 0) == 2  # 1.1 -> 2
    assert price.cost_micros(0, 0, 11) == 2
    assert price.cost_micros(5, 0, 5) == 1  # one ceiling over the whole request, not one per kind
    assert price.cost_micros(2, 2, 0) == 1  # 0.1 micro of cached input -> 1
    assert price.cost_micros(20, 20, 0) == 1  # 20 * 50_000 = exactly 1 micro


def test_worst_case_is_never_below_a_real_cost():
    prices = [Price(100_000, 50_000, 100_000), Price(150_000, 50_000, 600_000), Price(7, 0, 3),
              Price(1_200_000, 1_200_000, 1_200_000), Price(0, 0, 0), Price(333_333, 111_111, 999_999)]
    for price in prices:
        for num_prompt_tokens in (0, 1, 2, 7, 10, 11, 99, 1000, 12_345):
            for max_tokens in (0, 1, 3, 10, 11, 257):
                worst = price.worst_case_micros(num_prompt_tokens, max_tokens)
                for num_cached_tokens in {0, 1, num_prompt_tokens // 2, num_prompt_tokens}:
                    num_cached_tokens = min(num_cached_tokens, num_prompt_tokens)
                    for num_completion_tokens in range(max_tokens + 1):
                        real = price.cost_micros(num_prompt_tokens, num_cached_tokens, num_completion_tokens)
                        assert worst >= real, (price, num_prompt_tokens, num_cached_tokens, num_completion_tokens)


@pytest.mark.parametrize("args", [(1, 2, 0), (-1, 0, 0), (5, -1, 0), (5, 0, -1), (1.5, 0, 0)])
def test_cost_rejects_bad_counts(args):
    with pytest.raises(ValueError):
        Price(100_000, 50_000, 100_000).cost_micros(*args)


@pytest.mark.parametrize("values", [(100, 101, 100), (-1, 0, 0), (100, 50, -1), (0.5, 0, 0)])
def test_price_rejects_bad_values(values):
    with pytest.raises(ValueError):
        Price(*values)


def test_per_model_override_wins_over_the_buckets(tmp_path):
    path = tmp_path / "control.toml"
    path.write_text('[pricing.models."llama-3.1-8b-instruct"]\ninput = 0.15\ncached_input = 0.05\noutput = 0.60\n'
                    '[pricing.models."cheap"]\ninput_micros = 30_000\n')
    book = PriceBook.from_toml(path)
    override = book.price_for(make_dense(8 * B, name="llama-3.1-8b-instruct"))
    assert override == Price(input_micros=150_000, cached_input_micros=50_000, output_micros=600_000)
    # 1000 prompt (200 cached) + 100 completion: 800 * 150_000 + 200 * 50_000 + 100 * 600_000 = 190 micros.
    assert override.cost_micros(1000, 200, 100) == 190
    # No output: the input price; no cached_input: the default 50% off.
    assert book.price_for(make_moe(400 * B, name="cheap")) == Price(30_000, 15_000, 30_000)
    assert book.price_for(make_dense(8 * B, name="other")) == Price(200_000, 100_000, 200_000)


def test_user_file_replaces_only_the_sections_it_gives(tmp_path):
    path = tmp_path / "control.toml"
    path.write_text('[pricing]\ncached_input_discount_percent = 75\n'
                    '[[pricing.dense]]\nmax_params = "1B"\ninput = 0.05\noutput = 0.08\n'
                    '[[pricing.dense]]\ninput = 0.29\n')
    book = PriceBook.from_toml(path)
    assert [bucket.max_params for bucket in book.dense] == [1 * B, None]
    assert book.price_for(make_dense(1 * B)) == Price(50_000, 12_500, 80_000)
    assert book.price_for(make_dense(4 * B)) == Price(290_000, 72_500, 290_000)  # 0.29 is exact, not 289_999
    # The default moe buckets stay, with the user's discount.
    assert book.price_for(make_moe(47 * B)) == Price(500_000, 125_000, 500_000)
    # The tier ladder keeps its defaults too.
    _, ladder = load_control_toml(path)
    assert len(ladder.tiers) == 4


def test_discount_rounds_down_and_buckets_sort():
    data = {"pricing": {"cached_input_discount_percent": 33,
                        "dense": [{"input_micros": 9}, {"max_params": "500M", "input_micros": 100_001}],
                        "moe": [{"input": 1}]}}
    book = PriceBook.from_dict(data)
    assert [bucket.max_params for bucket in book.dense] == [500 * M, None]
    assert book.dense[0].price == Price(100_001, 67_000, 100_001)  # 100_001 * 67 // 100 = 67_000
    assert book.dense[1].price == Price(9, 6, 9)
    assert book.moe[0].price == Price(1_000_000, 670_000, 1_000_000)


def test_from_dict_fills_in_no_defaults():
    with pytest.raises(ConfigError, match="pricing"):
        PriceBook.from_dict({})
    with pytest.raises(ConfigError, match="pricing.moe"):
        PriceBook.from_dict({"pricing": {"dense": [{"input": 0.1}]}})


def _with(change):
    data = copy.deepcopy(read_control_document())
    change(data["pricing"])
    return data


@pytest.mark.parametrize("change, key", [
    (lambda p: p["dense"][0].update(ouput=0.1), "pricing.dense[0]: unknown key 'ouput'"),
    (lambda p: p["dense"][1].update(input="cheap"), "pricing.dense[1].input"),
    (lambda p: p["dense"][1].update(input=-0.1), "pricing.dense[1].input"),
    (lambda p: p["dense"][1].update(input=0.0000001), "pricing.dense[1].input"),
    (lambda p: p["dense"][1].update(input=float("nan")), "pricing.dense[1].input"),
    (lambda p: p["dense"][1].update(input=True), "pricing.dense[1].input"),
    (lambda p: p["dense"][1].update(input_micros=5), "pricing.dense[1]: give input or input_micros"),
    (lambda p: p.update(models={"x": {"input": 0.1, "output_micros": 1.5}}), 'pricing.models."x".output_micros'),
    (lambda p: p["dense"][1].pop("input"), "pricing.dense[1].input is missing"),
    (lambda p: p["dense"][0].update(cached_input=0.2), "pricing.dense[0].cached_input"),
    (lambda p: p["dense"][0].update(max_params="4X"), "pricing.dense[0].max_params"),
    (lambda p: p["dense"][0].update(max_params="0.5"), "pricing.dense[0].max_params"),
    (lambda p: p["dense"][0].update(max_params=0), "pricing.dense[0].max_params"),
    (lambda p: p["dense"][0].update(max_params="16B"), "pricing.dense: two buckets have the same max_params"),
    (lambda p: p["moe"][0].pop("max_params"), "pricing.moe needs exactly one bucket without max_params"),
    (lambda p: p["moe"].pop(), "pricing.moe needs exactly one bucket without max_params"),
    (lambda p: p.update(moe=[]), "pricing.moe must be one or more"),
    (lambda p: p.update(dense={"input": 0.1}), "pricing.dense must be one or more"),
    (lambda p: p.update(cached_input_discount_percent=150), "pricing.cached_input_discount_percent"),
    (lambda p: p.update(cached_input_discount_percent=12.5), "pricing.cached_input_discount_percent"),
    (lambda p: p.update(models={"x": {"output": 0.1}}), 'pricing.models."x".input is missing'),
    (lambda p: p.update(models={"x": 0.1}), 'pricing.models."x" must be a table'),
    (lambda p: p.update(currency="EUR"), "pricing: unknown key 'currency'"),
])
def test_bad_config_names_the_key(change, key):
    with pytest.raises(ConfigError) as info:
        PriceBook.from_dict(_with(change))
    assert key in str(info.value)


def test_bad_user_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        PriceBook.from_toml(tmp_path / "missing.toml")
    path = tmp_path / "broken.toml"
    path.write_text("[pricing\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        PriceBook.from_toml(path)
    path.write_text('[[pricing.moe]]\ninput = "free"\n')
    with pytest.raises(ConfigError, match=r"pricing.moe\[0\].input"):
        load_control_toml(path)


@pytest.mark.parametrize("value, num_params", [
    (4_000_000_000, 4 * B), ("4B", 4 * B), ("4b", 4 * B), ("500M", 500 * M), ("1.5B", 1_500 * M),
    ("56B", 56 * B), ("1T", 10**12), ("135000000", 135 * M), (" 7K ", 7000),
])
def test_parse_num_params(value, num_params):
    assert parse_num_params(value, "k") == num_params


@pytest.mark.parametrize("value, micros", [(0.10, 100_000), (0.29, 290_000), (1.2, 1_200_000), (50, 50 * M),
                                            (0.000001, 1), (0, 0), (1e-6, 1), (5000, 5_000 * M)])
def test_dollars_to_micros_is_exact(value, micros):
    assert dollars_to_micros(value, "k") == micros


def test_price_book_constructor_sorts_and_checks_buckets():
    cheap, dear = Price(1, 0, 1), Price(2, 1, 2)
    book = PriceBook(dense=(Bucket(None, dear), Bucket(10, cheap)), moe=(Bucket(None, dear),))
    assert book.dense == (Bucket(10, cheap), Bucket(None, dear))
    assert book.price_for(make_dense(10)) == cheap and book.price_for(make_moe(1)) == dear
    with pytest.raises(ConfigError, match="pricing.dense"):
        PriceBook(dense=(Bucket(10, cheap),), moe=(Bucket(None, dear),))


def test_control_package_imports_neither_torch_nor_fastapi():
    code = ("import sys, tokenforge.control.pricing, tokenforge.control.tiers, tokenforge.control.settings; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastapi')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
