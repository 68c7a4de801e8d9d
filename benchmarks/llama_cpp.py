"""Getting the llama.cpp peer for benchmarks/peers.py: its `llama-server` and `llama-quantize`,
built with cmake from the llama.cpp sources that the llama-cpp-python source distribution vendors,
and cached outside the repository (about 15 minutes on 2 cores, once). Also requantizes a GGUF
into the types llama.cpp has its fast CPU paths for (Q4_0, Q8_0). Never a dependency of CI.
"""

import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TARGETS = ("llama-server", "llama-quantize")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=ON")


def default_cache_dir() -> Path:
    base = Path(os.environ.get("TOKENFORGE_CACHE_DIR", Path.home() / ".cache" / "tokenforge"))
    return base / "peers"


@dataclass(frozen=True)
class LlamaCpp:
    server: Path
    quantize: Path
    llama_cpp_python_version: str

    def version(self) -> str:
        """`llama-server --version`: the build number and llama.cpp commit."""
        done = subprocess.run([str(self.server), "--version"], capture_output=True, text=True, timeout=60)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version")]
        return lines[0] if lines else "unknown"


def ensure_llama_cpp(cache_dir: Path, version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2) -> LlamaCpp:
    """The cached binaries; downloads the sources and builds them first if they are missing."""
    bin_dir = cache_dir / f"llama-cpp-python-{version}" / "bin"
    found = LlamaCpp(bin_dir / "llama-server", bin_dir / "llama-quantize", version)
    if found.server.exists() and found.quantize.exists():
        return found
    source_dir = _fetch_sources(cache_dir, version)
    build_dir = source_dir / "build"
    _log(f"building {', '.join(TARGETS)} in {build_dir} (about 15 minutes on 2 cores) ...")
    _run(["cmake", "-S", str(source_dir), "-B", str(build_dir), *CMAKE_FLAGS])
    _run(["cmake", "--build", str(build_dir), "--target", *TARGETS, f"-j{jobs}"])
    bin_dir.mkdir(parents=True, exist_ok=True)
    for target in TARGETS:
        shutil.copy2(build_dir / "bin" / target, bin_dir / target)
    return found


def _fetch_sources(cache_dir: Path, version: str) -> Path:
    """The llama.cpp tree vendored by the llama-cpp-python sdist (downloaded with pip, unpacked once)."""
    src_dir = cache_dir / "src"
    tree = src_dir / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    src_dir.mkdir(parents=True, exist_ok=True)
    sdist = src_dir / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={version}", "-d", str(src_dir)])
    with tarfile.open(sdist) as archive:
        archive.extractall(src_dir, filter="data")
    return tree


def quantized_model(llama: LlamaCpp, source: Path, qtype: str, cache_dir: Path, threads: int = 2) -> Path:
    """`source` requantized to `qtype` (cached); the source itself when it already is that type."""
    stem = source.name.removesuffix(".gguf")
    base, _, source_type = stem.rpartition(".")
    if source_type.upper() == qtype.upper():
        return source
    target = cache_dir / "models" / f"{base or stem}.{qtype}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        _run([str(llama.quantize), "--allow-requantize", str(source), str(partial), qtype, str(threads)])
        partial.rename(target)
    return target


def server_command(llama: LlamaCpp, model: Path, port: int, *, parallel: int, ctx_per_slot: int, threads: int,
                   alias: str) -> list[str]:
    """llama-server on loopback: `parallel` slots sharing one continuous batch, `ctx_per_slot` tokens each."""
    return [str(llama.server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--alias", alias,
            "--parallel", str(parallel), "-c", str(parallel * ctx_per_slot), "-t", str(threads),
            "-tb", str(threads), "--cont-batching"]


def _run(command: list[str]) -> None:
    _log("$ " + " ".join(command))
    subprocess.run(command, check=True)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
