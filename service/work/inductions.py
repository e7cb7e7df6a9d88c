"""Inductions submitted over HTTP: each runs ``Inducer`` in the background and records its progress and result."""

from __future__ import annotations

import asyncio
import logging

from service.induction.inducer import Generate, Inducer, InductionOptions
from service.store import Store
from service.taxonomy import Taxonomy
from service.work.jobs import JobRunner
from service.work.tasks import Tasks

log = logging.getLogger(__name__)


class InductionRunner:
    """Runs inductions submitted over HTTP as background tasks, recording progress in the store."""

    def __init__(self, store: Store, generators: dict[str, Generate], runner: JobRunner):
        self.store = store
        self.generators = generators
        self.runner = runner
        self._tasks = Tasks()  # each running induction and the token that asked
        self.live: dict[str, tuple[str, float]] = {}  # running inductions' (stage, progress): kept off the database

    def active_of(self, token_id: str | None) -> int:
        """Inductions a token has running (its limit is the jobs' one, ANNOTATE_MAX_ACTIVE_JOBS_PER_TOKEN)."""
        return self._tasks.active_of(token_id)

    def submit(self, induction_id: str, texts: list[str], options: InductionOptions, *, source: str,
               corpus_size: int, model: str, base: Taxonomy | None, push: bool, owner: str | None = None) -> None:
        """Start an induction in the background."""
        self._tasks.start(self._run(induction_id, texts, options, source=source, corpus_size=corpus_size,
                                    model=model, base=base, push=push), owner)

    async def close(self) -> None:
        """Cancel running inductions (they are marked failed on the next start)."""
        await self._tasks.close()

    async def _run(self, induction_id: str, texts: list[str], options: InductionOptions, *, source: str,
                   corpus_size: int, model: str, base: Taxonomy | None, push: bool) -> None:
        """Induce, optionally push the result as a taxonomy, and record the outcome."""

        def progress(stage: str, fraction: float) -> None:
            self.live[induction_id] = (stage, round(fraction, 3))

        progress("starting", 0.0)
        try:
            embedder = await asyncio.to_thread(self.runner.panels.embedder)
            chosen = self.runner.panels.models[model]
            inducer = Inducer(embedder.embed, self.generators[model], chosen.scorer, chosen.info,
                              model_input_chars=self.runner.panels.model_input_chars, progress=progress,
                              encoder=embedder.identity)
            result = await inducer.run(texts, options, source=source, base=base, corpus_size=corpus_size)
            if push:
                await asyncio.to_thread(self.store.taxonomies.put, result.taxonomy, result.yaml)
            await asyncio.to_thread(self.store.inductions.update, induction_id, status="succeeded", stage="done",
                                    progress=1.0, yaml_text=result.yaml, report=result.report)
        except Exception as exc:  # recorded for the client; the service goes on
            log.exception("induction failed", extra={"induction_id": induction_id})
            await asyncio.to_thread(self.store.inductions.update, induction_id, status="failed", stage="failed",
                                    progress=0.0, error=f"{type(exc).__name__}: {exc}")
        finally:
            self.live.pop(induction_id, None)
