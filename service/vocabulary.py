"""The service's enumerations, each defined once: pydantic models, typer options and SQL all use these.

Each is a ``Literal`` alias (a type checker sees it, pydantic validates it, typer offers its
values as choices, the schema's CHECK constraints list it); ``values(alias)`` gives its
members in order where code iterates them.

The words the code uses for the same things everywhere:

- ``options``: what an annotator chooses between, in order (a taxonomy's leaves, plus
  ``none_of_these`` where it may abstain); ``labels`` are a taxonomy's labels, parents included.
- ``distribution``: one document's {option: probability}; ``probs``: an (n, K) matrix of
  distributions whose columns follow ``options`` (numeric code, students, cleanlab).
- ``model``: a name in the models config (``ANNOTATE_MODELS_FILE``); the engine's own model
  id is ``EngineInfo.model``; an aggregate's rows have none (their method is in ``decoding``).
- ``annotator``: the key that identifies who made an annotation; ``name`` is how a job shows it.
"""

from __future__ import annotations

from typing import Literal, get_args

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Mode = Literal["stream", "batch"]  # a job's documents sent with it, or read from a server-side source by Ray Data
Scope = Literal["read", "write", "admin"]  # of an API token, each holding the ones before it
AnnotatorKind = Literal["llm", "embedding", "classifier"]
VoteMethod = Literal["majority_vote", "weighted_soft_vote", "dawid_skene", "calibrated_mean"]  # label models of votes
AggregationMethod = Literal[VoteMethod, "refined"]  # what a job's labels may be recomputed with
LongDocuments = Literal["truncate", "reject", "head_tail", "chunk"]  # how texts over the model's input are read
Calibration = Literal["none", "contextual"]  # of a tuned prompt
SamplingDesign = Literal["random", "stratified", "uncertainty"]  # of a gold sample
RegressionModel = Literal["linear", "logistic"]  # of a DSL regression
EstimateTarget = Literal["proportions", "regression"]
IssueKind = Literal["gold", "llm"]  # whose labels a label-issue ranking checks
InductionMethod = Literal["embedding", "llm"]  # how an induction proposes labels
StudentKind = Literal["ngram", "static", "minilm", "finetune"]  # distilled classifiers, cheapest first
DistillTarget = Literal["hard", "soft", "candidates"]
Weighting = Literal["none", "confidence"]
GoldFormat = Literal["json", "csv", "labelstudio"]  # a gold sample read back
LabelsFormat = Literal["jsonl", "parquet"]  # a job's labels read back
DocumentFilter = Literal["all", "abstained", "low_confidence", "failed"]  # the console's views of a job's documents


def values(alias: object) -> tuple[str, ...]:
    """The members of a ``Literal`` alias, nested ones flattened, in order."""
    members: list[str] = []
    for arg in get_args(alias):
        members += values(arg) if get_args(arg) else [arg]
    return tuple(members)


ACTIVE: tuple[JobState, ...] = ("queued", "running")  # a job still to run (or to resume after a restart)
FINAL: tuple[JobState, ...] = ("succeeded", "failed", "cancelled")
