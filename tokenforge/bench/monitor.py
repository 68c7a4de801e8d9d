"""Watches the machine while a load runs: the CPU used by the client, by the server (when its pid is
known) and by every other process, and the server's peak RSS (polled), so that a run disturbed by
another process can be recognised, recorded and thrown away.
"""

import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HEAVY_PROCESS_CORES = 0.1  # another process busier than this share of one core is listed by name
RSS_POLL_INTERVAL_S = 0.1
FAMILY_REFRESH_S = 2.0  # how often the server's children are looked up again


@dataclass
class MonitorOutput:
    wall_s: float
    machine_cpu_cores: float  # busy cores of the whole machine, averaged over the run
    client_cpu_cores: float  # this process
    server_cpu_cores: float | None  # the server and its children; None when its pid is unknown
    other_cpu_cores: float  # machine - client - server (the server included when its pid is unknown)
    server_peak_rss_bytes: int | None
    heavy_processes: list[dict] = field(default_factory=list)  # {pid, cpu_cores, command}, busiest first


def _busy_s(times) -> float:
    return times.user + times.system + getattr(times, "nice", 0.0) + getattr(times, "irq", 0.0) + \
        getattr(times, "softirq", 0.0) + getattr(times, "steal", 0.0)


def _process_cpu_s() -> dict[int, float]:
    """{pid: user + system CPU seconds} of every process we may read."""
    found = {}
    for process in psutil.process_iter(["cpu_times"]):
        times = process.info["cpu_times"]
        if times is not None:
            found[process.pid] = times.user + times.system
    return found


def _rss(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def _command(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        return " ".join(process.cmdline() or [process.name()])[:160]
    except psutil.Error:
        return "?"


class LoadMonitor:
    """`with LoadMonitor(server_pid) as monitor: ...` then `monitor.output`."""

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid
        self.output: MonitorOutput | None = None
        self._stop = threading.Event()
        self._peak_rss = 0
        self._thread = threading.Thread(target=self._poll_rss, name="bench-rss", daemon=True)

    def _server_family(self) -> list[psutil.Process]:
        try:
            server = psutil.Process(self.server_pid)
            return [server, *server.children(recursive=True)]
        except psutil.Error:
            return []

    def _server_rss(self) -> int:
        return _rss(self._server_family())

    def _poll_rss(self) -> None:
        family, found_at = self._server_family(), time.monotonic()
        while not self._stop.wait(RSS_POLL_INTERVAL_S):
            if time.monotonic() - found_at > FAMILY_REFRESH_S:  # finding children scans every process
                family, found_at = self._server_family(), time.monotonic()
            self._peak_rss = max(self._peak_rss, _rss(family))

    def __enter__(self) -> "LoadMonitor":
        self._started = time.perf_counter()
        self._machine_start = _busy_s(psutil.cpu_times())
        self._processes_start = _process_cpu_s()
        if self.server_pid is not None:
            self._peak_rss = self._server_rss()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        wall_s = time.perf_counter() - self._started
        machine_s = _busy_s(psutil.cpu_times()) - self._machine_start
        processes_end = _process_cpu_s()
        self._stop.set()
        if self.server_pid is not None:
            self._thread.join()
            self._peak_rss = max(self._peak_rss, self._server_rss())
        server_pids = {p.pid for p in self._server_family()} if self.server_pid is not None else set()
        deltas = {pid: cpu_s - self._processes_start.get(pid, 0.0) for pid, cpu_s in processes_end.items()}
        client_s = deltas.get(os.getpid(), 0.0)
        server_s = sum(deltas[pid] for pid in server_pids if pid in deltas)
        heavy = sorted(({"pid": pid, "cpu_cores": round(cpu_s / wall_s, 3), "command": _command(pid)}
                        for pid, cpu_s in deltas.items()
                        if pid != os.getpid() and pid not in server_pids and cpu_s / wall_s >= HEAVY_PROCESS_CORES),
                       key=lambda p: -p["cpu_cores"])
        known_s = sum(deltas[pid] for pid in server_pids | {os.getpid()} if pid in deltas)  # offline: one process
        self.output = MonitorOutput(
            wall_s=wall_s, machine_cpu_cores=machine_s / wall_s, client_cpu_cores=client_s / wall_s,
            server_cpu_cores=server_s / wall_s if self.server_pid is not None else None,
            other_cpu_cores=max(machine_s - known_s, 0.0) / wall_s,
            server_peak_rss_bytes=self._peak_rss if self.server_pid is not None else None,
            heavy_processes=heavy)


def environment() -> dict:
    """The machine and software of a run (light: no torch import)."""
    cpu_model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                          if line.startswith("model name")), cpu_model)
    return {"cpu_model": cpu_model, "num_cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform(), "load_average_at_start": list(os.getloadavg())}
