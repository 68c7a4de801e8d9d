"""The control plane in the request path: the key of every inference route (401 / 403), per-minute
limits (x-ratelimit-* headers, 429), the reservation before the engine runs (429
insufficient_quota), and the request's one usage record, written in a shielded finally.

Control-plane calls block on the store, so they run in worker threads.
"""

import asyncio
import logging

from starlette.requests import Request

from tokenforge.control.keys import Principal
from tokenforge.control.metering import Usage
from tokenforge.control.plane import Admission, ControlPlane
from tokenforge.control.pricing import ModelFacts
from tokenforge.control.rate_limits import RateLimitState

logger = logging.getLogger(__name__)

RATE_LIMIT_STATE_KEY = "rate_limit_headers"  # in scope["state"]; the middleware adds them to the response
SETTLE_RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


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

    async def authorize(self, request: Request, scope: str) -> Principal:
        """The request's principal, which may use `scope`; counts it against the per-minute limits."""
        if self.auth_required:
            principal = await asyncio.to_thread(self.plane.authenticate, bearer_key(request), scope)
        else:
            if self._local is None:
                self._local = await asyncio.to_thread(self.plane.local_principal)
            principal = self._local
        request.state.principal = principal
        if scope == "inference":
            _remember(request, await asyncio.to_thread(self.plane.count_request, principal))
        return principal

    async def admit(self, request: Request, model: ModelFacts, endpoint: str, request_id: str,
                    num_prompt_tokens: int, max_completion_tokens: int) -> "Meter":
        """Reserves the request's worst case; the Meter it returns must be settled exactly once."""
        admission = await asyncio.to_thread(self.plane.admit, request.state.principal, request_id, model, endpoint,
                                            num_prompt_tokens, max_completion_tokens)
        _remember(request, admission.rate_limit)
        return Meter(self.plane, admission)


class Meter:
    """Settles one admitted request: its usage record and the real cost, once, whatever happens."""

    def __init__(self, plane: ControlPlane, admission: Admission):
        self.plane = plane
        self.admission = admission
        self._settled = False

    async def settle(self, usage: Usage, status: str) -> None:
        """Shielded: a cancelled caller (client gone, shutdown) does not stop the write."""
        if self._settled:
            return
        self._settled = True
        await asyncio.shield(asyncio.ensure_future(self._write(usage, status)))

    async def _write(self, usage: Usage, status: str) -> None:
        request_id = self.admission.metered.request_id
        for delay_s in (*SETTLE_RETRY_DELAYS_S, None):
            try:
                await asyncio.to_thread(self.plane.settle, self.admission.metered, usage, status)
                return
            except Exception:  # noqa: BLE001 - the store may be down for a while: retry, then say so
                if delay_s is None:
                    logger.exception("usage of request %s could not be recorded; its reservation will expire",
                                     request_id)
                    return
                logger.warning("recording the usage of request %s failed; retrying in %.1f s", request_id, delay_s)
                await asyncio.sleep(delay_s)


def _remember(request: Request, state: RateLimitState | None) -> None:
    if state is not None:
        request.state.rate_limit_headers = state.headers()
