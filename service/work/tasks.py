"""The one task runner: background work of the service (job workers, inductions, trainings) as asyncio tasks.

Every runner starts its work through a ``Tasks``, which remembers who asked for each task
(the token, for per-token limits), forgets a task when it ends, and cancels them all at
shutdown. Work that a cancelled task leaves unfinished is recorded as such in the store by
its runner (jobs resume, inductions and trainings are marked failed on the next start).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine


class Tasks:
    """Running background tasks and the owner of each."""

    def __init__(self) -> None:
        self._owners: dict[asyncio.Task, str | None] = {}

    def start(self, work: Coroutine, owner: str | None = None) -> asyncio.Task:
        """Run ``work`` in the background until it ends or the runner closes."""
        task = asyncio.create_task(work)
        self._owners[task] = owner
        task.add_done_callback(lambda done: self._owners.pop(done, None))
        return task

    def active_of(self, owner: str | None) -> int:
        """Tasks running for one owner."""
        return sum(who == owner for who in self._owners.values())

    async def close(self) -> None:
        """Cancel every running task and wait until each has stopped."""
        tasks = list(self._owners)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
