"""How a document longer than the model's input (``model_input_chars``, the budget) reaches the model.

The taxonomy's ``long_documents``, or a job's override, picks one of:

- ``truncate``: the model reads the first ``budget`` characters.
- ``reject``: as ``truncate`` for the documents a job accepts; longer ones are refused at
  submission (stream mode; ``service.api.jobs``).
- ``head_tail``: the first two thirds of the budget and the last third, joined by ``MARKER``:
  openings state the subject and endings conclude, so the two ends say more about a
  document's label than a second slice of its middle would. Each cut moves to a
  whitespace within a tenth of its part, so no word is split.
- ``chunk``: overlapping windows of at most ``budget`` characters (``windows``), each scored
  as its own engine request; ``combine`` averages their scores. A document needing more
  than ``MAX_WINDOWS`` windows is read through that many spread evenly over it, so one
  document's compute stays bounded; its annotation is then ``truncated``.

A text within the budget is read whole, as one piece, in every mode, so it gets the same
annotation whatever the mode. ``chars_seen`` counts the characters of the document's text
that reach the model (the marker is not the document's); ``truncated`` is
``chars_seen < len(text)``.
"""

from __future__ import annotations

HEAD_TAIL = "head_tail"
CHUNK = "chunk"
MARKER = "\n[…]\n"
HEAD_SHARE = 2 / 3  # of the budget; the tail gets the rest
OVERLAP = 0.1  # of a window: context shared by neighbouring windows, so no sentence is only ever seen cut
MAX_WINDOWS = 16  # engine requests per document at most


def model_texts(text: str, mode: str, budget: int, *, max_windows: int = MAX_WINDOWS) -> tuple[list[str], int]:
    """The texts the model reads for one document (one per request), and ``chars_seen``."""
    if len(text) <= budget:
        return [text], len(text)
    if mode == HEAD_TAIL:
        return head_tail(text, budget)
    if mode == CHUNK:
        spans = windows(text, budget, max_windows=max_windows)
        return [text[start:stop] for start, stop in spans], chars_covered(spans)
    return [text[:budget]], budget


def head_tail(text: str, budget: int) -> tuple[list[str], int]:
    """The head and the tail of a text longer than ``budget``, joined by the marker, and ``chars_seen``."""
    head = int(budget * HEAD_SHARE)
    tail = budget - head
    head_stop = _cut_back(text, head, head // 10)
    tail_start = _cut_forward(text, len(text) - tail, tail // 10)
    return [text[:head_stop] + MARKER + text[tail_start:]], head_stop + len(text) - tail_start


def windows(text: str, size: int, *, max_windows: int = MAX_WINDOWS) -> list[tuple[int, int]]:
    """(start, stop) of windows of at most ``size`` characters that overlap and cover the text, at most ``max_windows``.

    A window ends after the last whitespace of its final ``OVERLAP`` share when there is one;
    the next starts ``OVERLAP`` before that end, moved on past a whitespace within half the
    overlap when there is one; so neighbours always share characters and every character is
    in a window (thinned by ``_spread`` beyond ``max_windows``).
    """
    overlap = int(size * OVERLAP)
    spans, start = [], 0
    while start + size < len(text):
        stop = _cut_back(text, start + size, overlap)
        spans.append((start, stop))
        start = _cut_forward(text, stop - overlap, overlap // 2)
    spans.append((start, len(text)))
    return _spread(spans, max_windows)


def chars_covered(spans: list[tuple[int, int]]) -> int:
    """Characters inside at least one of the spans (in order of start)."""
    seen = reached = 0
    for start, stop in spans:
        seen += max(stop - max(start, reached), 0)
        reached = max(reached, stop)
    return seen


def combine(window_scores: list[list[float]]) -> list[float]:
    """One document's scores from its windows' scores: their mean, per continuation.

    For log-probabilities the mean is a product of experts: the softmax of the mean is the
    normalised geometric mean of the windows' distributions (for multi-label, of each
    yes/no pair), so a label wins when the whole text supports it. The max would let the
    one window with the most extreme score decide (a quoted advertisement in a speech
    labels the speech an advertisement) and grows more confident with every window added.
    One window's scores come back unchanged.
    """
    lengths = {len(scores) for scores in window_scores}
    if len(lengths) > 1:
        raise ValueError(f"windows answered different numbers of scores: {sorted(lengths)}")
    if len(window_scores) == 1:
        return list(window_scores[0])
    return [sum(column) / len(window_scores) for column in zip(*window_scores)]


def reading_spec(mode: str, max_windows: int = MAX_WINDOWS) -> dict:
    """The part of an annotator's spec that says how long texts are read.

    Empty for reading the head (``truncate``, ``reject``), so annotators from before the
    modes existed keep their keys (cache hits, resumable jobs).
    """
    if mode == HEAD_TAIL:
        return {"long_documents": mode, "head_share": round(HEAD_SHARE, 4)}
    if mode == CHUNK:
        return {"long_documents": mode, "overlap": OVERLAP, "max_windows": max_windows}
    return {}


def _cut_back(text: str, stop: int, reach: int) -> int:
    """``stop`` moved back to a word's end: after the last whitespace among the ``reach`` characters before it, if any."""
    return next((i + 1 for i in range(stop - 1, stop - reach - 1, -1) if text[i].isspace()), stop)


def _cut_forward(text: str, start: int, reach: int) -> int:
    """``start`` (at least 1) moved on to a word's beginning.

    That is after the first whitespace from ``start - 1`` on, if there is one within ``reach``.
    """
    return next((i + 1 for i in range(start - 1, start - 1 + reach) if text[i].isspace()), start)


def _spread(spans: list[tuple[int, int]], max_windows: int) -> list[tuple[int, int]]:
    """At most ``max_windows`` of the spans, evenly spaced over the text (the first and the last kept)."""
    if len(spans) <= max_windows:
        return spans
    step = (len(spans) - 1) / max(max_windows - 1, 1)
    return [spans[round(k * step)] for k in range(max_windows)]
