"""DrainingServer: uvicorn whose first SIGTERM / SIGINT drains the server. New requests get 503
`shutting_down` (the listener stays open, so clients hear why and load balancers see /health fail),
the requests in flight finish, then it exits; a second signal exits at once."""

import logging
import threading
import time

import uvicorn

from tokenforge.server.middleware import Lifecycle

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig, frame) -> None:
        if self.lifecycle.draining:
            super().handle_exit(sig, frame)
            return
        logger.info("draining %d requests in flight (up to %.0f s)", self.lifecycle.num_in_flight,
                    self.drain_timeout_s)
        self.lifecycle.draining = True
        threading.Thread(target=self._drain, name="tokenforge-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while self.lifecycle.num_in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        logger.info("drained (%d requests still in flight); exiting", self.lifecycle.num_in_flight)
        self.should_exit = True
