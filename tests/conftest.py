"""Shared fixtures: the real default model, loaded once per test session."""

import pytest

from tokenforge.config import DEFAULT_MODEL, ModelConfig


@pytest.fixture(scope="session")
def smollm2_path():
    from tokenforge.model.pull import resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_path):
    """(LoadedModel, dtype, device) of SmolLM2 in fp32 on the CPU (linear layers too: the parity
    tests compare with transformers), shared by integration tests."""
    from tokenforge.engine.factory import load

    return load(ModelConfig(model=str(smollm2_path), dtype="float32", device="cpu", quantization="none"))


@pytest.fixture(scope="session")
def smollm2_int8_loaded(smollm2_path):
    """(LoadedModel, dtype, device) of SmolLM2 as served on the CPU: int8 linear layers, whose
    native kernels give a token the same bits in any batch (MKL's fp32 GEMM may round a row
    differently with the number of rows beside it)."""
    from tokenforge.engine.factory import load

    return load(ModelConfig(model=str(smollm2_path), dtype="float32", device="cpu", quantization="int8"))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request) -> str:
    """Runs a store test on both backends (PostgreSQL must be reachable: never skipped)."""
    return request.param


@pytest.fixture
def store(store_backend, tmp_path):
    from tests.store_helpers import make_store

    with make_store(store_backend, tmp_path) as store:
        yield store
