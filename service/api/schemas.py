"""Pydantic models of the HTTP API's bodies: the public contract, published as OpenAPI."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.labelling.aggregation import SILENT, silent
from service.store.jobs import Job, JobAnnotator
from service.vocabulary import (
    AggregationMethod,
    Calibration,
    DistillTarget,
    EstimateTarget,
    InductionMethod,
    IssueKind,
    JobState,
    Mode,
    RegressionModel,
    SamplingDesign,
    StudentKind,
    Weighting,
)
from service.work.submission import DocumentIn


class TuneDocument(BaseModel):
    """One sample document of a prompt tuning, with its label when a person has given one."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    label: str | None = Field(None, description="A leaf of the taxonomy; with 20 or more, the choice is by accuracy.")


class TuneRequest(BaseModel):
    """A sample of the corpus to choose the taxonomy's prompt on (service.labelling.tuning)."""

    model_config = ConfigDict(extra="forbid")
    documents: list[TuneDocument] = Field(min_length=2, max_length=500,
                                          description="The sample, typically 50-200 documents of the corpus.")
    taxonomy_version: str | None = Field(None, description="A content-hash version; default the newest.")
    model: str | None = Field(None, description="A model from the models config; default the taxonomy's, else the "
                                                "service's. The choice holds for this model only.")
    prompts: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]] | None = Field(
        None, min_length=1, max_length=10,
        description="Candidate templates (GET /v1/prompts); default every shipped single-label prompt the model "
                    "can score.")
    calibrations: list[Calibration] | None = Field(
        None, min_length=1, description="How each candidate prompt is tried: as it comes (none), contextually "
                                        "calibrated, or both (the default).")


class JobCreated(BaseModel):
    """Answer to a submitted job."""

    job_id: str
    status: JobState
    total: int
    taxonomy_version: str
    model: str
    mode: Mode = "stream"
    annotators: list[str] = []


class AnnotatorStatus(BaseModel):
    """One annotator of a job and its progress."""

    name: str
    annotator: str
    kind: str
    model: str | None = None
    prompt: str | None = None
    weight: float | None = None
    weight_reason: str | None = Field(None, description="Why the service gave this annotator its weight (0: the "
                                                        "default panel's LLM, no better than chance in its tuning).")
    done: int
    failed: int
    abstained: int


class JobStatus(BaseModel):
    """A job's state and progress."""

    job_id: str
    status: JobState
    taxonomy: str
    taxonomy_version: str
    model: str | None = None
    mode: Mode = "stream"
    annotator: str
    total: int
    shards: int = 0
    shards_done: int = 0
    done: int
    failed: int
    abstained: int
    cached: int
    progress: float = Field(description="Share of the work done: every annotator's documents, then aggregation.")
    routed: int | None = Field(None, description="Cascade: documents sent on to the LLM.")
    routing_rate: float | None = Field(None, description="Cascade: routed / total.")
    annotators: list[AnnotatorStatus] = []
    aggregation: str | None = None
    refinement: dict | None = Field(
        None, description="Aggregation 'refined': what the regression on the documents' embeddings learnt from "
                          "(panel labels, gold labels or nothing), how many gold labels, and the gold accuracy of the "
                          "panel, of the label-free refinement and of the refined labels (cross-fitted); "
                          "read_by_llm: whether the regression also read the texts with the job's LLM.")
    docs_per_s: float | None = Field(
        None, description="Documents' worth of work (all annotators) finished per second since the start.")
    eta_s: float | None = Field(None, description="Seconds left at the current pace, while running.")
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_job(cls, job: Job) -> JobStatus:
        """Build from the store's job."""
        fields = {k: v for k, v in asdict(job).items() if k in cls.model_fields}
        fields["annotators"] = [a | {"weight_reason": SILENT if silent(a["weight"]) else None}
                                for a in fields.get("annotators", [])]
        members = job.annotators
        aggregation = job.annotator_spec.get("aggregation") if len(members) > 1 else None
        counted = (members[:1] if aggregation == "cascade" else [m for m in members if not silent(m.weight)]
                   if len(members) > 1 else [])
        steps = job.total * (len(counted) + 1)
        finished = job.done + job.failed + sum(m.done + m.failed for m in counted)
        progress = round(finished / steps, 4) if steps else 1.0
        return cls(**fields, mode="stream" if job.batch is None else "batch", progress=progress,
                   aggregation=aggregation, refinement=job.annotator_spec.get("refinement") if members[1:] else None,
                   **_pace(job, progress),
                   **_routing(members, job.total) if aggregation == "cascade" else {})


def _pace(job: Job, progress: float) -> dict:
    """Throughput since the start, and the time left at that pace while the job runs (timestamps are naive UTC)."""
    if job.started_at is None:
        return {}
    end = job.finished_at or datetime.now(timezone.utc)
    elapsed = (end - job.started_at).total_seconds()
    if elapsed <= 0:
        return {}
    pace = {"docs_per_s": round(progress * job.total / elapsed, 3)}  # every annotator's share of the work
    if job.status == "running" and 0 < progress < 1:
        pace["eta_s"] = round(elapsed * (1 - progress) / progress, 1)
    return pace


def _routing(members: list[JobAnnotator], total: int) -> dict:
    """A cascade's LLM calls: its second annotator's documents."""
    routed = members[1].done + members[1].failed
    return {"routed": routed, "routing_rate": round(routed / total, 4) if total else None}


class TaxonomyCreated(BaseModel):
    """Answer to a pushed taxonomy."""

    name: str
    version: str
    created: bool
    advice: list[str] = Field(default_factory=list, description="What would make it label better (labels without examples).")


class SqlRequest(BaseModel):
    """One read-only SQL statement; limits may only be lowered."""

    model_config = ConfigDict(extra="forbid")
    sql: str = Field(min_length=1)
    timeout_s: float | None = Field(None, ge=0.1)
    max_rows: int | None = Field(None, ge=1)
    max_bytes: int | None = Field(None, ge=1)


class SqlResponse(BaseModel):
    """Columns and rows of a query; ``truncated`` when the row cap or the byte cap cut it, ``truncated_reason`` which."""

    columns: list[str]
    rows: list[list]
    truncated: bool
    truncated_reason: str | None
    elapsed_ms: float


class InductionRequest(BaseModel):
    """Induce a taxonomy from inline texts or a server-side source file."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="Name of the induced taxonomy.")
    documents: list[str | DocumentIn] | None = Field(None, min_length=2)
    source: str | None = Field(None, description="A .jsonl/.csv/.parquet file, its path relative to "
                                                 "ANNOTATE_INPUT_DIR.")
    text_field: str = "text"
    id_field: str = "id"
    max_labels: int = Field(8, ge=2, le=100)
    sample_size: int = Field(2000, ge=2, le=100_000, description="Documents sampled (uniformly) from the corpus.")
    report_size: int = Field(200, ge=1, le=10_000, description="Sample documents the review labels.")
    seed: int = 0
    method: InductionMethod = Field(
        "embedding", description="embedding: clusters named by the LLM (any model); llm: TnT-LLM's mini-batch "
                                 "loop (needs a strong model behind the OpenAI-compatible engine).")
    allow_none: bool = Field(False, description="Add a none_of_these label (small models overuse it).")
    base: str | None = Field(None, description="A pushed taxonomy to extend: proposes additions and merges.")
    model: str | None = Field(None, description="The model that names labels and reviews them; default the service's.")
    push: bool = Field(False, description="Push the induced taxonomy as a new version when done.")

    @model_validator(mode="after")
    def _one_input(self) -> InductionRequest:
        """Exactly one of documents and source."""
        if (self.documents is None) == (self.source is None):
            raise ValueError("give exactly one of 'documents' (inline texts) or 'source' (server-side file)")
        return self


class InductionStatus(BaseModel):
    """An induction's progress, and its YAML and report once it succeeded."""

    induction_id: str
    name: str
    status: Literal["queued", "running", "succeeded", "failed"]
    stage: str | None = None
    progress: float | None = None
    yaml: str | None = None
    report: dict | None = None
    error: str | None = None
    created_at: datetime
    finished_at: datetime | None = None


class GoldSampleRequest(BaseModel):
    """Draw a gold sample of a finished job for people to label."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(200, ge=1, le=100_000, description="Documents to draw (expected size for 'uncertainty').")
    design: SamplingDesign = Field(
        "random", description="random: simple random sample; stratified: by predicted label, proportional; "
                              "uncertainty: Poisson sampling that over-weights low-confidence documents.")
    seed: int = 0
    replace: bool = Field(False, description="Replace an existing sample (gold labels given so far are kept).")


class CalibrateRequest(BaseModel):
    """Conformal candidate sets at level 1−alpha, and an abstention threshold for a target accuracy."""

    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.1, gt=0, lt=1, description="Sets miss the true label with probability at most alpha.")
    target_accuracy: float = Field(0.9, gt=0, lt=1, description="Accuracy wanted on the documents kept.")
    seed: int = 0


class EstimateRequest(BaseModel):
    """Label shares, or a regression of one label on document metadata, valid under LLM error (DSL)."""

    model_config = ConfigDict(extra="forbid")
    target: EstimateTarget = "proportions"
    outcome: str | None = Field(None, description="regression: the label whose indicator is the outcome.")
    covariates: list[str] | None = Field(None, max_length=100,
                                         description="regression: meta fields (numbers, or strings one-hot) "
                                         "or 'text_chars'.")
    model: RegressionModel = "linear"
    level: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the intervals.")
    seed: int = Field(0, description="Seed of the cross-fitting folds.")

    @model_validator(mode="after")
    def _regression_needs_outcome(self) -> EstimateRequest:
        """A regression names its outcome label and covariates."""
        if self.target == "regression" and (not self.outcome or not self.covariates):
            raise ValueError("target 'regression' needs 'outcome' (a label) and 'covariates' (meta fields)")
        return self


class LabelIssuesRequest(BaseModel):
    """Which labels to check for likely errors, and how much of the ranking to answer."""

    model_config = ConfigDict(extra="forbid")
    kind: IssueKind = Field("gold", description="gold: the human labels; llm: the job's own labels.")
    limit: int = Field(50, ge=1, le=10_000, description="Rows of the ranking in the answer (all are kept).")
    max_documents: int = Field(20_000, ge=10, le=1_000_000,
                               description="The job's labels checked at most (kind llm), a random sample beyond.")


class AggregateRequest(BaseModel):
    """Recompute a several-annotator job's labels with another aggregation method ('refined' after gold labels:
    relabel with them)."""

    model_config = ConfigDict(extra="forbid")
    method: AggregationMethod


class ClassifierRequest(BaseModel):
    """Distil one or more finished jobs' labels into a student classifier."""

    model_config = ConfigDict(extra="forbid")
    jobs: list[str] = Field(min_length=1, description="Finished jobs of one taxonomy version to learn from.")
    kind: StudentKind = Field(
        "minilm", description="ngram: hashed n-grams; static: model2vec static embeddings; minilm: MiniLM "
                              "embeddings; finetune: MiniLM fine-tuned (each a linear head but the last).")
    name: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*$",
                             description="Students of one name are versioned; default TAXONOMY-KIND. A directory "
                                         "name: letters, digits, '_', '-' and single dots, starting with a letter "
                                         "or digit (never '.', '..', a path or a hidden name).")
    targets: DistillTarget | None = Field(
        None, description="What the student learns; default: the option that agrees best with the LLM on a "
                          "validation split.")
    weighting: Weighting | None = Field(None, description="Weight documents by the LLM's "
                                                                              "confidence; default: chosen as above.")
    abstained: Literal["exclude", "none"] = Field("exclude", description="Leave abstained documents out, or teach "
                                                                         "them as none_of_these.")
    holdout: float = Field(0.2, ge=0.05, le=0.5, description="Share of LLM-labelled documents kept for testing.")
    epochs: int = Field(2, ge=1, le=20, description="finetune: passes over the training documents.")
    seed: int = 0


class PredictRequest(BaseModel):
    """Texts to label with a student."""

    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, max_length=10_000)
