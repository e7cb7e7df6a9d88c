"""What the refinement read is kept (service.work.kept_vectors): a job relabelled again reads only texts it has not read.

Pure bookkeeping over a counting reader; the service-level check (a relabelled job embeds nothing again) is in
tests/test_default_panel.py.
"""

from __future__ import annotations

import numpy as np

from service.work.kept_vectors import KeptVectors


def _counting(asked: list[list[str]]):
    """A reader whose vector for a text is (its length, its first character's code), and which notes each call."""

    def read(texts: list[str]) -> np.ndarray:
        asked.append(list(texts))
        return np.array([[len(text), ord(text[0])] for text in texts], dtype=float)

    return read


def test_each_text_is_read_once_and_answers_keep_the_callers_order():
    """The second call asks only for the new text; a text twice in one call is read once; rows follow the call."""
    asked: list[list[str]] = []
    read = KeptVectors().cached("minilm", _counting(asked))
    first = read(["apple", "kiwi", "apple"])
    second = read(["kiwi", "banana", "apple"])
    assert asked == [["apple", "kiwi"], ["banana"]]
    assert first.tolist() == [[5, 97], [4, 107], [5, 97]]
    assert second.tolist() == [[4, 107], [6, 98], [5, 97]]


def test_readers_do_not_share_and_a_failed_reading_is_not_kept():
    """Another reader's vectors are its own; None (a model that could not read) is passed on and asked again."""
    kept, asked, other = KeptVectors(), [], []
    kept.cached("minilm", _counting(asked))(["apple"])
    kept.cached("smollm2", _counting(other))(["apple"])
    failing: list[list[str]] = []

    def lost(texts: list[str]) -> None:
        failing.append(texts)
        return None

    down = kept.cached("llama", lost)
    assert down(["apple"]) is None and down(["apple"]) is None
    assert asked == [["apple"]] and other == [["apple"]] and failing == [["apple"], ["apple"]]


def test_past_the_limit_the_least_recently_used_go_first_and_a_large_call_is_whole():
    """A call of more texts than are kept still answers every one; afterwards only the most recent stay."""
    asked: list[list[str]] = []
    kept = KeptVectors(kept=3)
    read = kept.cached("minilm", _counting(asked))
    assert read(["a1", "b22", "c333", "d4444", "e55555"]).shape == (5, 2)
    read(["c333", "d4444", "e55555"])
    read(["a1"])
    assert asked == [["a1", "b22", "c333", "d4444", "e55555"], ["a1"]]
    assert all(vector.base is None for vector in kept._vectors.values())  # copies: no kept row holds its batch
