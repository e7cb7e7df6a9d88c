"""Students in the service: training them from jobs in the background, and their predictions as labels.

``POST /v1/classifiers`` records a student as the next version of its name, gathers the
jobs' labelled documents (``training_data``) and runs ``distill.distill`` as a Ray task
(one CPU; on a cluster it runs wherever one is free), which writes the student to
``DATA_DIR/classifiers/NAME/vN/`` and returns its report; the store keeps both. The
``StudentServer`` deployment (``service.serve.app``) loads students from those directories
and returns class probabilities, which ``as_labels`` turns into the same shape as LLM
labels through the taxonomy's own rules (``decide_single``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from service.distill.training import TrainingData, distill
from service.errors import InvalidInput
from service.labelling.labeller import decide_single, options_of
from service.settings import Settings
from service.store import Store
from service.taxonomy import Taxonomy
from service.work.tasks import Tasks

log = logging.getLogger(__name__)


def training_data(store: Store, job_ids: list[str]) -> tuple[TrainingData, str, str]:
    """The labelled documents of one or more jobs of the same taxonomy version; also (taxonomy, version)."""
    jobs = [store.jobs.get(job_id) for job_id in job_ids]
    versions = {(job.taxonomy, job.taxonomy_version) for job in jobs}
    if len(versions) > 1:
        raise InvalidInput(f"jobs: the jobs label with different taxonomies or versions ({sorted(versions)}); a "
                           "student learns one taxonomy version")
    unfinished = [job.job_id for job in jobs if job.status != "succeeded"]
    if unfinished:
        raise InvalidInput(f"jobs: {', '.join(unfinished)} have not succeeded; distil finished jobs")
    name, version = versions.pop()
    taxonomy = store.taxonomies.get(name, version).taxonomy
    if taxonomy.multi_label:
        raise InvalidInput(f"taxonomy {name!r} is multi-label; students learn single-label taxonomies")
    classes = list(options_of(taxonomy))
    texts, probs, candidates, abstained, gold, pi = [], [], [], [], [], []
    for job in jobs:
        columns = store.quality.population(job.job_id, classes, with_text=True)
        texts += columns["text"]
        probs.append(columns["probs"])
        candidates += [[name in (c or []) for name in classes] for c in columns["candidates"]]
        abstained += columns["abstained"]
        gold += [g if not np.isnan(p) else None for g, p in zip(columns["gold_label"], columns["inclusion_prob"])]
        pi.append(columns["inclusion_prob"])
    data = TrainingData(texts=texts, probs=np.vstack(probs), candidates=np.array(candidates, dtype=bool),
                        abstained=np.array(abstained, dtype=bool), classes=classes, gold=gold, pi=np.concatenate(pi))
    return data, name, version


def as_labels(probs: list[list[float]], classes: list[str], taxonomy: Taxonomy) -> list[dict]:
    """Class probabilities as labels: distribution, label, candidates and abstention, as the LLM's."""
    out, every = [], {name: 0.0 for name in options_of(taxonomy)}  # a class the student never saw has p = 0
    for row in probs:
        annotation = decide_single(every | dict(zip(classes, map(float, row))), taxonomy)
        out.append({"label": annotation.label, "confidence": annotation.confidence,
                    "candidates": annotation.candidates, "abstained": annotation.abstained,
                    "abstain_reason": annotation.abstain_reason, "distribution": annotation.distribution})
    return out


def student_dir(data_dir: Path, name: str) -> Path:
    """DATA_DIR/classifiers/NAME, refused unless NAME is one directory right inside it.

    The API's pattern already refuses such names; this guards every other way a name arrives."""
    root = (Path(data_dir) / "classifiers").resolve()
    path = None if "\x00" in name else (root / name).resolve()
    if path is None or path.parent != root:
        raise InvalidInput(f"name: {name!r} is not a plain directory name; use letters, digits, '_', '-' and single "
                           "dots, starting with a letter or digit")
    return path


class ClassifierRunner:
    """Trains students submitted over HTTP as background Ray tasks, recording them in the store."""

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        self._tasks = Tasks()

    async def submit(self, *, jobs: list[str], kind: str, name: str | None, options: dict) -> dict:
        """Check the jobs, record the student, start training; returns its id, name and version."""
        data, taxonomy, version = await asyncio.to_thread(training_data, self.store, jobs)
        classifier_id = "clf_" + uuid.uuid4().hex[:16]
        name = name or f"{taxonomy}-{kind}"
        folder = student_dir(self.settings.data_dir, name)  # refused before anything is recorded
        number = await asyncio.to_thread(self.store.classifiers.create, classifier_id, name=name, kind=kind,
                                         taxonomy=taxonomy, taxonomy_version=version, jobs=jobs, options=options)
        out_dir = folder / f"v{number}"
        meta = {"classifier_id": classifier_id, "name": name, "version": number, "taxonomy": taxonomy,
                "taxonomy_version": version, "jobs": jobs}
        self._tasks.start(self._train(classifier_id, data, kind=kind, out_dir=out_dir, meta=meta, options=options))
        return {"classifier_id": classifier_id, "name": name, "version": number, "status": "training",
                "documents": len(data.texts)}

    async def _train(self, classifier_id: str, data: TrainingData, *, kind: str, out_dir: Path, meta: dict,
                     options: dict) -> None:
        """Run distillation as a Ray task and record the outcome."""
        import ray

        try:
            # a fresh worker: its own peak RSS. Ray types a remote function by its positional parameters only, and
            # distill's are keyword-only: its .remote() takes them all the same
            task: Any = ray.remote(num_cpus=1, max_retries=0, max_calls=1)(distill)  # type: ignore[arg-type]
            report = await task.remote(data, kind=kind, out_dir=out_dir, models_dir=self.settings.models_dir.resolve(),
                                       meta=meta, **options)
            await asyncio.to_thread(self.store.classifiers.finish, classifier_id, report=report, path=str(out_dir))
        except Exception as exc:  # recorded for the client; the service goes on
            log.exception("training failed", extra={"classifier_id": classifier_id})
            cause = getattr(exc, "cause", None) or exc
            await asyncio.to_thread(self.store.classifiers.finish, classifier_id,
                                    error=f"{type(cause).__name__}: {cause}")

    async def close(self) -> None:
        """Cancel trainings in flight (they are marked failed on the next start)."""
        await self._tasks.close()
