"""Queue depth and throughput of a model deployment, kept per replica and exported as Ray metrics.

Ray exports the metrics in Prometheus format (``annotate_model_queue_depth``,
``annotate_model_documents_total``, ``annotate_model_batch_size``; tag ``model``) on each
node's metrics port; ``GET /v1/models`` reports the same numbers as JSON.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from ray.serve import metrics

BATCH_BOUNDARIES: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ModelStats:
    """Counts documents waiting, in flight and done, and the time spent scoring."""

    def __init__(self, model: str):
        self.model = model
        self.queued = 0
        self.documents = 0
        self.batches = 0
        self.busy_s = 0.0
        self.started = time.monotonic()
        self._tags = {"model": model}  # Serve adds deployment, replica and application tags itself
        self._queue = metrics.Gauge("annotate_model_queue_depth", description="documents waiting or being scored",
                                    tag_keys=("model",))
        self._done = metrics.Counter("annotate_model_documents_total", description="documents scored",
                                     tag_keys=("model",))
        self._batch = metrics.Histogram("annotate_model_batch_size", description="documents per engine call",
                                        boundaries=BATCH_BOUNDARIES, tag_keys=("model",))

    @contextmanager
    def waiting(self, documents: int = 1):
        """Count documents from their arrival until they are scored."""
        self.queued += documents
        self._queue.set(self.queued, tags=self._tags)
        try:
            yield
        finally:
            self.queued -= documents
            self._queue.set(self.queued, tags=self._tags)

    @contextmanager
    def busy(self, documents: int):
        """Time one engine call over a batch of documents."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.busy_s += time.monotonic() - started
            self.documents += documents
            self.batches += 1
            self._done.inc(documents, tags=self._tags)
            self._batch.observe(documents, tags=self._tags)

    def report(self) -> dict:
        """The numbers as plain JSON."""
        return {"model": self.model, "queue_depth": self.queued, "documents": self.documents, "batches": self.batches,
                "mean_batch": round(self.documents / self.batches, 2) if self.batches else 0.0,
                "docs_per_busy_s": round(self.documents / self.busy_s, 2) if self.busy_s else 0.0,
                "uptime_s": round(time.monotonic() - self.started, 1)}
