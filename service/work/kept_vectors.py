"""The vectors the refinement reads documents with, kept between aggregations of the same texts.

Relabelling a job after each batch of gold labels (``refined``) reads every text with the
encoder and the job's LLM: a 2,000-character speech costs about 0.5 s on 2 cores, so a 10,000-
speech job would spend over an hour per relabelling re-reading what it read before.
``KeptVectors`` keeps each text's vectors by (who read it, the text's hash), the least recently
used first out past ``VECTORS_KEPT``, so the second relabelling reads only new texts (and the
first finds the embedding annotator's vectors, which read the same characters). It
lives in the job runner's process: a restart starts it empty, which costs one reading again.
Two aggregations of the same new texts at once both read them (harmless: the same vectors).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar, cast

import numpy as np

from service.documents import text_hash

VECTORS_KEPT = 20_000  # at most about 100 MB (SmolLM2's two views of 576 float32, MiniLM's 384): jobs relabelled in turn
Vectors = TypeVar("Vectors", bound="np.ndarray | None")


class KeptVectors:
    """Vectors of texts by (reader, text hash), least recently used first out; safe across aggregation threads."""

    def __init__(self, kept: int = VECTORS_KEPT):
        self.kept = kept
        self._vectors: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, reader: str, read: Callable[[list[str]], Vectors]) -> Callable[[list[str]], Vectors]:
        """``read`` that asks only for texts ``reader`` has not read yet; a None answer is passed on, not kept.

        ``reader`` must name everything the vectors depend on (model, engine, numeric type, the prompt read in).
        """

        def vectors(texts: list[str]) -> Vectors:
            if not texts:
                return read(texts)
            keys = [(reader, text_hash(text)) for text in texts]
            with self._lock:
                found = {key: self._vectors[key] for key in keys if key in self._vectors}
            unread = {key: text for key, text in zip(keys, texts) if key not in found}
            if unread:
                fresh = read(list(unread.values()))
                if fresh is None:
                    return fresh
                # copies: a kept row must not hold its whole batch's array in memory after the others are evicted
                found.update(zip(unread, (row.copy() for row in np.asarray(fresh, dtype=np.float32))))
            with self._lock:
                for key in keys:
                    self._vectors[key] = found[key]
                    self._vectors.move_to_end(key)
                while len(self._vectors) > self.kept:
                    self._vectors.popitem(last=False)
            return cast(Vectors, np.stack([found[key] for key in keys]))

        return vectors
