"""AsyncEngine: the EngineCore driven by its own thread, with an asyncio front for the server.

Each request gets an asyncio queue of RequestOutput deltas. Leaving the iterator early (client
gone, task cancelled) aborts the request, which frees its KV blocks before the next step. A step
that raises ends the requests in the engine with EngineStepError, frees their blocks and goes on;
after MAX_CONSECUTIVE_STEP_FAILURES failing steps in a row (a broken model or device, not a bad
request) the loop dies: every waiting caller gets EngineDeadError and `is_healthy` turns false.
"""

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from tokenforge.engine.engine_core import EngineCore
from tokenforge.engine.outputs import RequestOutput
from tokenforge.engine.request import Request
from tokenforge.errors import EngineDeadError, EngineStepError, QueueFullError
from tokenforge.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0
STUCK_STEP_S = 120.0  # a single step longer than this makes the engine unhealthy
MAX_CONSECUTIVE_STEP_FAILURES = 3


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


class AsyncEngine:
    def __init__(self, core: EngineCore):
        self.core = core
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._to_add: deque[tuple[Request, _Stream]] = deque()
        self._to_abort: deque[str] = deque()
        self._streams: dict[str, _Stream] = {}  # guarded by _lock
        self._stopping = False
        self._closed = False  # set under _lock once no stream will ever be served again
        self.error: BaseException | None = None
        self.step_started_at: float | None = None  # set while a step runs
        self.num_step_failures = 0  # steps that raised and were recovered from
        self._thread = threading.Thread(target=self._run, name="tokenforge-engine", daemon=True)

    # -- caller side (any thread with an asyncio loop) --

    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    @classmethod
    def build(cls, build_core: Callable[[], EngineCore]) -> "AsyncEngine":
        """An engine whose core is built (loaded) in the engine's own thread, which then runs it;
        raises what building raised. Prefer it to AsyncEngine(core).start() on a CPU: libgomp stops
        its worker threads' spin-waiting once more threads have used OpenMP than there are CPUs
        (the loading thread's team counts too), and small steps then run ~40% slower."""
        built: Future[AsyncEngine] = Future()

        def load_and_run() -> None:
            try:
                engine = cls(build_core())
            except BaseException as exc:  # noqa: BLE001 - the caller raises it
                built.set_exception(exc)
                return
            engine._thread = threading.current_thread()
            built.set_result(engine)
            engine._run()

        threading.Thread(target=load_and_run, name="tokenforge-engine", daemon=True).start()
        return built.result()

    @property
    def is_healthy(self) -> bool:
        if self.error is not None or not self._thread.is_alive():
            return False
        started = self.step_started_at
        return started is None or time.monotonic() - started < STUCK_STEP_S

    @property
    def tokenizer(self):
        return self.core.tokenizer

    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._streams)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yields the request's output deltas; the last one has finished=True."""
        self._check_alive()
        request = self.core.make_request(request_id, prompt_token_ids, params)
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                self._check_alive()
                raise EngineDeadError("the engine is not running")
            if len(self._streams) >= self.core.config.scheduler.max_num_waiting + self.core.config.scheduler.max_num_seqs:
                raise QueueFullError("the engine's queue is full; retry later")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._to_add.append((request, stream))
        self._wakeup.set()
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None:
                return
            stream.finished = True
            self._to_abort.append(request_id)
        self._wakeup.set()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine has stopped: {self.error}")
        if self._stopping or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")

    # -- engine thread --

    def _run(self) -> None:
        num_failed_in_a_row = 0
        try:
            while not self._stopping:
                self._take_inputs()
                if not self.core.has_unfinished_requests():
                    self._wakeup.wait(IDLE_WAIT_S)
                    self._wakeup.clear()
                    continue
                self.step_started_at = time.monotonic()
                try:
                    outputs = self.core.step()
                except Exception as exc:  # noqa: BLE001 - recover unless it keeps failing
                    num_failed_in_a_row += 1
                    if num_failed_in_a_row >= MAX_CONSECUTIVE_STEP_FAILURES:
                        raise
                    self._recover(exc)
                    continue
                finally:
                    self.step_started_at = None
                num_failed_in_a_row = 0
                self._deliver(outputs)
        except BaseException as exc:  # noqa: BLE001 - any failure must reach the callers
            logger.exception("engine loop died")
            self.error = exc
            self._fail_all(EngineDeadError(f"the engine failed: {type(exc).__name__}: {exc}"))
        finally:
            self.step_started_at = None
            if self.error is None:
                self._fail_all(EngineDeadError("the engine has shut down"))

    def _take_inputs(self) -> None:
        with self._lock:
            to_add, self._to_add = self._to_add, deque()
            to_abort, self._to_abort = self._to_abort, deque()
        for request, stream in to_add:
            if not stream.finished:
                self.core.add_request(request)
        for request_id in to_abort:
            self.core.abort_request(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def _recover(self, exc: Exception) -> None:
        """After a failed step: ends every request in the core with EngineStepError and frees its
        blocks (nothing of the failed step was committed: the scheduler updates after the forward)."""
        self.num_step_failures += 1
        request_ids = list(self.core.scheduler.requests)  # every request the core holds, unfinished
        logger.error("engine step failed; ending its %d requests and going on", len(request_ids), exc_info=exc)
        error = EngineStepError(f"the engine failed while running this request: {type(exc).__name__}: {exc}")
        for request_id in request_ids:
            self.core.abort_request(request_id)
        with self._lock:
            streams = [self._streams.pop(request_id) for request_id in request_ids if request_id in self._streams]
        for stream in streams:
            stream.finished = True
            _call_soon(stream.loop, stream.queue.put_nowait, error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None or stream.finished:
                    continue
                if out.finished:
                    stream.finished = True
                    del self._streams[out.request_id]
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            self._closed = True  # checked under the same lock by generate(): no stream slips in
            streams, self._streams = list(self._streams.values()), {}
            self._to_add.clear()
        for stream in streams:
            stream.finished = True
            _call_soon(stream.loop, stream.queue.put_nowait, error)


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the caller's loop is closed: nobody is listening any more
