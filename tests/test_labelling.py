"""Decisions from scores: distributions, candidate sets, abstention reasons, multi-label.

Scores are chosen by hand so every expected probability can be derived on paper.
"""

from __future__ import annotations

import math

import pytest

from service.engines.base import EngineInfo
from service.labelling.labeller import Labeller
from service.labelling.prompts import load_template
from service.taxonomy import parse_taxonomy

ENGINE = EngineInfo(engine="test", model="none", decoding={})


def _taxonomy(*, multi_label=False, threshold=None, allow_none=False, margin=0.0, mass=0.9) -> str:
    """YAML for a three-label taxonomy with the given decision settings."""
    abstention = f"  allow_none: {str(allow_none).lower()}\n  ambiguity_margin: {margin}\n"
    if threshold is not None:
        abstention += f"  threshold: {threshold}\n"
    return (f"name: t\ndescription: d\ninstruction: Pick one.\nmulti_label: {str(multi_label).lower()}\n"
            f"candidate_mass: {mass}\nabstention:\n{abstention}labels:\n"
            "  - {name: a, description: first}\n  - {name: b, description: second}\n"
            "  - {name: c, description: third}\n")


def _labeller(**kwargs) -> Labeller:
    """A labeller over the three-label taxonomy."""
    taxonomy = parse_taxonomy(_taxonomy(**kwargs))
    template = load_template("classify_multi" if kwargs.get("multi_label") else "classify")
    return Labeller(taxonomy, taxonomy.content_hash(), template, ENGINE, 50)


def _logs(*probs: float) -> list[float]:
    """Log-probabilities whose softmax is exactly ``probs``."""
    return [math.log(p) for p in probs]


def test_distribution_is_the_softmax_and_candidates_reach_the_mass():
    """0.6/0.3/0.1 with mass 0.9: candidates {a, b}, label a."""
    result = _labeller().decide(_logs(0.6, 0.3, 0.1))
    assert result.distribution == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1})
    assert (result.label, result.candidates, result.abstained) == ("a", ["a", "b"], False)
    assert result.confidence == pytest.approx(0.6)


def test_confident_top_label_is_a_singleton_set():
    """0.95 alone reaches 0.9."""
    assert _labeller().decide(_logs(0.05, 0.95, 1e-9)).candidates == ["b"]


def test_below_threshold_abstains_with_reason():
    """Top 0.5 under threshold 0.6: abstained, label None, candidates still reported."""
    result = _labeller(threshold=0.6).decide(_logs(0.5, 0.4, 0.1))
    assert (result.abstained, result.abstain_reason, result.label) == (True, "below_threshold", None)
    assert result.candidates == ["a", "b"]


def test_none_of_these_wins_means_out_of_taxonomy():
    """With allow_none the extra option is scored; when it wins the document is out of taxonomy."""
    labeller = _labeller(allow_none=True)
    assert labeller.options == ("a", "b", "c", "none_of_these")
    result = labeller.decide(_logs(0.1, 0.1, 0.1, 0.7))
    assert (result.abstained, result.abstain_reason) == (True, "out_of_taxonomy")
    assert "none_of_these" not in result.candidates and sum(result.distribution.values()) == pytest.approx(1)


def test_close_call_is_ambiguous():
    """Top two 0.45 and 0.40 with margin 0.1: ambiguous."""
    result = _labeller(margin=0.1).decide(_logs(0.45, 0.40, 0.15))
    assert result.abstain_reason == "ambiguous"


def test_multi_label_gives_each_label_its_own_probability():
    """yes/no pairs: P(a)=0.8, P(b)=0.6, P(c)=0.1 with threshold 0.5 selects a and b."""
    scores = _logs(0.8, 0.2) + _logs(0.6, 0.4) + _logs(0.1, 0.9)
    result = _labeller(multi_label=True).decide(scores)
    assert result.distribution == pytest.approx({"a": 0.8, "b": 0.6, "c": 0.1})
    assert (result.labels, result.label, result.abstained) == (["a", "b"], "a", False)


def test_multi_label_with_nothing_selected_abstains():
    """No label reaches the threshold: abstained below threshold."""
    scores = _logs(0.3, 0.7) * 3
    result = _labeller(multi_label=True).decide(scores)
    assert (result.labels, result.abstained, result.abstain_reason) == ([], True, "below_threshold")


def test_wrong_number_of_scores_is_an_error():
    """Malformed engine output raises ValueError (the runner records the document as failed)."""
    with pytest.raises(ValueError, match="expected 3 scores, got 2"):
        _labeller().decide([0.0, 0.0])


def test_request_truncates_long_text_and_counts_what_the_model_sees():
    """By default the model sees the first model_input_chars characters; chars_seen says how many."""
    labeller = _labeller()
    (request,), chars_seen = labeller.requests("x" * 80)
    assert chars_seen == 50 and "x" * 50 in request.user and "x" * 51 not in request.user
    assert request.continuations == ("a", "b", "c")
    assert labeller.requests("short")[1] == 5


def test_annotator_key_changes_with_what_determines_the_output():
    """Same inputs, same key; a different taxonomy version or engine gives another key."""
    taxonomy = parse_taxonomy(_taxonomy())
    template = load_template("classify")
    key = Labeller(taxonomy, "v1", template, ENGINE, 50).key
    assert key == Labeller(taxonomy, "v1", template, ENGINE, 50).key
    assert key != Labeller(taxonomy, "v2", template, ENGINE, 50).key
    assert key != Labeller(taxonomy, "v1", template, EngineInfo("other", "none", {}), 50).key


def test_multi_label_with_none_allowed_abstains_out_of_taxonomy():
    """In multi-label, choosing nothing is "none of these" when the taxonomy allows it."""
    result = _labeller(multi_label=True, allow_none=True).decide(_logs(0.3, 0.7) * 3)
    assert (result.abstained, result.abstain_reason) == (True, "out_of_taxonomy")


def test_blank_document_annotation():
    """The empty-text verdict has the taxonomy's options at zero and no candidates."""
    result = _labeller().empty()
    assert result.distribution == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert (result.abstained, result.abstain_reason, result.candidates) == (True, "empty_text", [])


def test_a_completion_template_builds_plain_text_requests_with_demonstrations():
    """classify_fewshot: no chat markup, the taxonomy's examples label by label, answers that end with their line."""
    taxonomy = parse_taxonomy(_taxonomy().replace(
        "{name: a, description: first}", "{name: a, description: first, examples: [a one, a two]}").replace(
        "{name: b, description: second}", "{name: b, description: second, examples: [b one]}"))
    labeller = Labeller(taxonomy, taxonomy.content_hash(), load_template("classify_fewshot"), ENGINE, 50)
    (request,), seen = labeller.requests("some text")
    assert request.chat is False and seen == len("some text")
    assert request.continuations == (" a\n", " b\n", " c\n")
    assert request.user == "Text: some text\nLabel:"
    shots = [line for line in request.system.splitlines() if line.startswith(("Text:", "Label:"))]
    assert shots == ["Text: a one", "Label: a", "Text: b one", "Label: b", "Text: a two", "Label: a"]
    assert _labeller().requests("x")[0][0].chat is True  # chat templates stay chats
