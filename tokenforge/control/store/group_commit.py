"""GroupCommit: the writes every request makes (its admission, its usage record) run in shared
transactions. One writer thread takes every job queued meanwhile and runs them one after the other
in one transaction with one commit, so a burst of requests pays for one BEGIN and one fsync, and
never waits on a lock held by another thread of this process.

A job is a function of a Session. Later jobs see what earlier ones wrote (one session): limits hold
exactly as if each ran in its own transaction. If a job raises (a refusal: over the spending or
rate limit), the batch rolls back and runs again with each job in its own savepoint, so the raising
job's writes alone are taken back and the others commit. Jobs must therefore write nothing outside
the session. If the commit fails (the store is unreachable), every job of the batch gets that error.
"""

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from tokenforge.control.store.db import Store

logger = logging.getLogger(__name__)

MAX_JOBS_PER_COMMIT = 64


@dataclass
class _Job:
    work: Callable[[Session], Any]
    future: Future = field(default_factory=Future)


class GroupCommit:
    def __init__(self, store: Store, max_jobs_per_commit: int = MAX_JOBS_PER_COMMIT):
        self.store = store
        self.max_jobs_per_commit = max_jobs_per_commit
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tokenforge-store-writer", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[Session], Any]) -> Future:
        """Runs `work(db)` in the next transaction; its Future holds what it returned or raised
        (`.result()` waits for it; `asyncio.wrap_future` awaits it)."""
        if self._closed:
            raise RuntimeError("the store's writer is closed")
        job = _Job(work)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Runs what was submitted, then stops the writer thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            jobs = [self._queue.get()]
            while len(jobs) < self.max_jobs_per_commit:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in jobs
            jobs = [job for job in jobs if job is not None and job.future.set_running_or_notify_cancel()]
            if jobs:
                self._commit(jobs)

    def _commit(self, jobs: list[_Job]) -> None:
        try:
            with self.store.transaction() as db:
                results = [job.work(db) for job in jobs]
        except Exception:  # noqa: BLE001 - a job refused or the store failed: find out which, apart
            self._commit_apart(jobs)
            return
        for job, result in zip(jobs, results):
            job.future.set_result(result)

    def _commit_apart(self, jobs: list[_Job]) -> None:
        """Each job in its own savepoint of one transaction: a job that raises gets its error and
        takes back only its own writes."""
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            with self.store.transaction() as db:
                for job in jobs:
                    try:
                        with db.begin_nested():
                            outcomes.append((job.work(db), None))
                    except Exception as exc:  # noqa: BLE001 - delivered to the job's submitter
                        outcomes.append((None, exc))
        except Exception as exc:  # noqa: BLE001 - nothing was committed: every job failed with it
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, (result, error) in zip(jobs, outcomes):
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
