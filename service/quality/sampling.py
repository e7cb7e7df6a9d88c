"""Gold sample designs: which documents people label, and each one's inclusion probability.

Pure functions over numpy arrays. ``draw_sample`` draws without replacement under a design
(random, stratified by predicted label, or over-weighting low confidence, Poisson), returning
the inclusion probability π of each drawn document: every estimate weights a gold label by 1/π.
"""

from __future__ import annotations

import numpy as np

from service.quality.metrics import ABSTAINED
from service.vocabulary import SamplingDesign, values

DESIGNS = values(SamplingDesign)


def draw_sample(*, predicted: list[str | None], confidence: np.ndarray, size: int, design: str,
                seed: int = 0, floor: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the population of len(predicted)) of the documents drawn, and their inclusion probabilities."""
    population = len(predicted)
    confidence = np.asarray(confidence, dtype=float)
    if design not in DESIGNS:
        raise ValueError(f"design: unknown {design!r}; choose one of {', '.join(DESIGNS)}")
    if confidence.shape != (population,):
        raise ValueError(f"confidence: expected {population} values (one per document), got shape {confidence.shape}")
    if not 1 <= size <= population:
        raise ValueError(f"size: cannot draw {size} documents from a population of {population} (need at least 1)")
    if size == population:
        return np.arange(population), np.ones(population)
    rng = np.random.default_rng(seed)
    if design == "random":
        return np.sort(rng.choice(population, size=size, replace=False)), np.full(size, size / population)
    if design == "stratified":
        return _draw_stratified(predicted, size, rng)
    if not 0 < floor <= 1 or not np.all((confidence >= 0) & (confidence <= 1)):
        raise ValueError(f"floor must lie in (0, 1] (got {floor}) and every confidence in [0, 1]")
    pi = _poisson_probabilities(floor + 1 - confidence, size)
    drawn = np.flatnonzero(rng.random(population) < pi)
    return drawn, pi[drawn]


def _draw_stratified(predicted: list[str | None], size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Simple random samples within each predicted label, allocated proportionally."""
    strata = np.array([ABSTAINED if p is None else p for p in predicted], dtype=object)
    names, index = np.unique(strata, return_inverse=True)
    if size < len(names):
        raise ValueError(f"size: {size} is fewer than the {len(names)} strata (predicted labels); "
                         "stratified sampling draws at least one document from each")
    counts = np.bincount(index)
    drawn_h: list[np.ndarray] = []  # per stratum
    pi_h: list[np.ndarray] = []
    for h, n_h in enumerate(_allocate(counts, size)):
        drawn_h.append(rng.choice(np.flatnonzero(index == h), size=n_h, replace=False))
        pi_h.append(np.full(n_h, n_h / counts[h]))
    drawn, pi = np.concatenate(drawn_h), np.concatenate(pi_h)
    order = np.argsort(drawn)
    return drawn[order], pi[order]


def _allocate(counts: np.ndarray, size: int) -> np.ndarray:
    """Proportional allocation by largest remainder, then one document for any stratum left empty."""
    quota = size * counts / counts.sum()
    alloc = np.floor(quota).astype(int)
    alloc[np.argsort(alloc - quota, kind="stable")[: size - alloc.sum()]] += 1
    while (alloc == 0).any():
        donor = np.argmax(np.where(alloc > 1, alloc - quota, -np.inf))
        alloc[donor] -= 1
        alloc[np.flatnonzero(alloc == 0)[0]] += 1
    return alloc


def _poisson_probabilities(need: np.ndarray, size: int) -> np.ndarray:
    """π_i = min(1, c·need_i) summing to size: documents capped at 1 leave the others to share the rest."""
    capped = np.zeros(len(need), dtype=bool)
    while True:
        scale = (size - capped.sum()) / need[~capped].sum()
        newly = ~capped & (scale * need >= 1)
        if not newly.any():
            return np.where(capped, 1.0, scale * need)
        capped |= newly
