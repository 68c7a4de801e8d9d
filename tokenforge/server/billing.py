"""The control plane in the request path: the key of every inference route (401 / 403), per-minute
limits (x-ratelimit-* headers, 429), the reservation before the engine runs (429
insufficient_quota), and the request's one usage record, written in a shielded finally.

Key checks block on the store, so they run in worker threads; admissions and usage records are
awaited from the store's writer (ControlPlane.writes), which commits many requests' writes at once.
"""

import asyncio
import logging
import time
from collections.abc import Coroutine
from datetime import UTC, datetime

from starlette.requests import Request

from tokenforge.control.keys import Principal
from tokenforge.control.metering import Usage
from tokenforge.control.plane import Admission, ControlPlane
from tokenforge.control.pricing import ModelFacts
from tokenforge.control.rate_limits import RateLimitState

logger = logging.getLogger(__name__)

SETTLE_FIRST_RETRY_S = 0.5
SETTLE_MAX_RETRY_S = 30.0


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


class Billing:
    """One server's link to its control plane. With auth off, requests act as the local organisation
    (metered, unlimited); with auth on, as the organisation of their key."""

    def __init__(self, plane: ControlPlane, auth_required: bool):
        self.plane = plane
        self.auth_required = auth_required
        self._local: Principal | None = None
        self._retries: set[asyncio.Task] = set()  # settlements waiting for the store to come back

    def retry_later(self, retry: Coroutine) -> None:
        task = asyncio.get_running_loop().create_task(retry)
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def drain(self, timeout_s: float) -> None:
        """At shutdown: gives pending settlements `timeout_s` to reach the store."""
        if self._retries:
            await asyncio.wait(set(self._retries), timeout=timeout_s)

    async def authorize(self, request: Request, scope: str, count: bool = False) -> Principal:
        """The request's principal, which may use `scope`; `count`: count it against the per-minute
        request limit now (generation routes are counted with their tokens at admission)."""
        if self.auth_required:
            principal = await asyncio.to_thread(self.plane.authenticate, bearer_key(request), scope)
        else:
            if self._local is None:
                self._local = await asyncio.to_thread(self.plane.local_principal)
            principal = self._local
        request.state.principal = principal
        if count:
            _remember(request, await asyncio.to_thread(self.plane.count_request, principal))
        return principal

    async def admit(self, request: Request, model: ModelFacts, endpoint: str, request_id: str,
                    num_prompt_tokens: int, max_completion_tokens: int) -> "Meter":
        """Reserves the request's worst case; the Meter it returns must be settled exactly once."""
        admission = await asyncio.wrap_future(self.plane.admit(request.state.principal, request_id, model, endpoint,
                                                               num_prompt_tokens, max_completion_tokens))
        _remember(request, admission.rate_limit)
        return Meter(self, admission)


class Meter:
    """Settles one admitted request: its usage record and the real cost, once, whatever happens."""

    def __init__(self, billing: "Billing", admission: Admission):
        self.billing = billing
        self.admission = admission
        self._settled = False

    async def settle(self, usage: Usage, status: str) -> None:
        """Shielded: a cancelled caller (client gone, shutdown) does not stop the write. If the store
        is down, the write goes on in the background, retried until the reservation would expire."""
        if self._settled:
            return
        self._settled = True
        if not await asyncio.shield(self._try_write(usage, status)):
            self.billing.retry_later(self._retry(usage, status))

    async def _try_write(self, usage: Usage, status: str) -> bool:
        try:
            await asyncio.wrap_future(self.billing.plane.settle(self.admission.metered, usage, status))
            return True
        except Exception:  # noqa: BLE001 - the store may be down for a while: retried by the caller
            logger.warning("recording the usage of request %s failed; retrying in the background",
                           self.admission.metered.request_id, exc_info=True)
            return False

    async def _retry(self, usage: Usage, status: str) -> None:
        metered = self.admission.metered
        held_s = (datetime.now(UTC) - metered.started_at).total_seconds()
        deadline = time.monotonic() + self.billing.plane.reservation_ttl_s - held_s
        delay_s = SETTLE_FIRST_RETRY_S
        while time.monotonic() + delay_s < deadline:
            await asyncio.sleep(delay_s)
            if await self._try_write(usage, status):
                return
            delay_s = min(delay_s * 2, SETTLE_MAX_RETRY_S)
        logger.error("usage of request %s could not be recorded before its reservation expired",
                     self.admission.metered.request_id)


def _remember(request: Request, state: RateLimitState | None) -> None:
    """Leaves the x-ratelimit-* headers in the request's state, where the middleware adds them."""
    if state is not None:
        request.state.rate_limit_headers = state.headers()
