"""/metrics shows the engine's speculative-decoding statistics, for models that speculate."""

from types import SimpleNamespace

from tokenforge.server.metrics import ServerMetrics

BASE_STATS = {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0, "prefix_cache_hit_rate": 0.0}


def make_engine(stats: dict):
    return SimpleNamespace(core=SimpleNamespace(stats=lambda: stats), is_healthy=True)


def test_spec_gauges_for_speculating_models_only():
    spec = {**BASE_STATS, "spec_num_drafts": 4, "spec_num_draft_tokens": 10, "spec_num_accepted_tokens": 6,
            "spec_acceptance_rate": 0.6, "spec_mean_accepted_length": 2.5}
    text = ServerMetrics({"fast": make_engine(spec), "plain": make_engine(dict(BASE_STATS))}).render().decode()
    assert 'tokenforge_spec_decode_acceptance_rate{model="fast"} 0.6' in text
    assert 'tokenforge_spec_decode_num_accepted_tokens{model="fast"} 6.0' in text
    assert 'tokenforge_spec_decode_mean_accepted_length{model="fast"} 2.5' in text
    assert 'model="plain"} ' not in "\n".join(line for line in text.splitlines() if "spec_decode" in line)
