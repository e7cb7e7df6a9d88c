"""Every setting of the service, declared once; each reads ``ANNOTATE_<NAME>`` from the environment.

The "Configuration" table of docs/configuration.md is generated from this class's field descriptions
(``annotate settings``), so a setting cannot exist undocumented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_ADMIN_TOKEN_CHARS = 24


class Settings(BaseSettings):
    """Service configuration; override with ANNOTATE_* variables or CLI flags."""

    model_config = SettingsConfigDict(env_prefix="ANNOTATE_", extra="ignore")

    data_dir: Path = Field(Path("data"), description="Directory holding the DuckDB file, exports and caches.")
    input_dir: Path = Field(
        Path("inputs"), description="Server-side job sources ('source' in POST /v1/jobs and inductions) must lie "
                                    "under this directory; it may not hold the data dir."
    )
    job_workers: int = Field(1, ge=1, description="Jobs labelled at the same time (they share the model deployment).")
    models_dir: Path = Field(
        Path.home() / ".cache" / "annotate" / "models",
        description="Where converted model weights are cached (the GGUF is converted once, then loaded fast).",
    )
    host: str = Field("127.0.0.1", description="Address the HTTP service binds.")
    port: int = Field(8000, description="Port the HTTP service binds.")
    models_file: Path | None = Field(
        None, description="Models config (e.g. deploy/models.yaml) naming engines and models; unset: 'embedded' and 'fake'."
    )
    model: str | None = Field(None, description="Default model, a name from the models config (unset: the file's default).")
    batch_size: int = Field(32, ge=1, description="Documents per job batch; progress is committed once per batch.")
    shard_size: int = Field(
        2000, ge=1, description="Rows per shard of a batch job (mode 'batch'): the unit of Ray Data tasks and of resuming.")
    batch_concurrency: int = Field(
        2, ge=1, description="Shards of a batch job labelled at the same time (Ray Data tasks in flight).")
    batch_task_cpus: float = Field(
        0.25, gt=0, description="CPUs Ray reserves per batch task (they mostly wait on the model deployment).")
    allow_remote_sources: bool = Field(
        False, description="Let batch jobs read object-store URIs (s3://, gs://) with the service's credentials.")
    engine_max_batch: int = Field(16, ge=1, description="Most documents the model deployment scores in one forward pass.")
    engine_batch_wait_s: float = Field(0.01, ge=0, description="How long the model deployment waits to fill a batch.")
    engine_threads: int = Field(0, ge=0, description="Torch threads for the embedded engine (0: one per core).")
    engine_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Numeric type of the embedded engine: 'auto' measures float32 and bfloat16 matrix "
                            "products once per machine (cached in the models dir) and keeps the faster.")
    embedding_model_dir: Path | None = Field(
        None, description="A sentence-transformers checkpoint directory (mean or CLS pooling) that the embedding "
                          "annotator, the refinement, demonstrations, shortlists and induction read documents with; "
                          "unset: the packaged all-MiniLM-L6-v2. Students and label-issue audits keep MiniLM.")
    default_annotators: Literal["llm+embedding", "llm"] = Field(
        "llm+embedding", description="Annotators of a stream job that names none: the LLM and the embedding annotator, "
                                     "aggregated by 'refined' unless the job sets 'aggregation' (multi-label "
                                     "taxonomies: the LLM alone), or 'llm' alone. Batch jobs and cascades run the LLM.")
    auto_tune: bool = Field(
        True, description="A default-panel job on a taxonomy version not yet tuned for its model first tunes the "
                          "prompt on up to 100 of its own documents (it needs 20), without labels (as `annotate "
                          "taxonomy tune`), stores the choice for later jobs, then labels.")
    model_input_chars: int = Field(
        2000, ge=100, description="Characters of a document the model reads in one request; longer documents are "
                                  "read as long_documents says (truncate, head_tail, chunk) and flagged when cut."
    )
    max_scored_labels: int = Field(100, ge=2, description="A single-label taxonomy with more leaves than this is "
                                                         "scored only through a shortlist (taxonomy or job "
                                                         "'shortlist', whose k or max_k may not pass it); jobs "
                                                         "without one are refused, and so are jobs on a multi-label "
                                                         "taxonomy with more leaves (scored whole, a yes and a no "
                                                         "for each).")
    max_document_chars: int = Field(1_000_000, ge=1, description="Documents longer than this are rejected with 413.")
    max_documents_per_job: int = Field(100_000, ge=1, description="Most documents one inline job may carry.")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest HTTP request body accepted.")
    max_upload_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest taxonomy YAML or gold-label upload: they are parsed in Python, "
                                              "so they get a tighter limit than other bodies.")
    taxonomy_max_labels: int = Field(1000, ge=1, description="Most labels a pushed taxonomy may have.")
    taxonomy_max_chars: int = Field(
        500_000, ge=1, description="Most characters of instruction, descriptions and examples a pushed taxonomy may have.")
    sql_timeout_s: float = Field(10.0, gt=0, description="Time limit of a user SQL query; a request may only lower it.")
    sql_max_rows: int = Field(10_000, ge=1, description="Most rows a user SQL query returns; the answer says when it was cut.")
    sql_max_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Most bytes of JSON rows a user SQL answer carries, measured while "
                                               "fetching; the answer says when it was cut, a single larger row is a 413.")
    sql_max_concurrent_per_token: int = Field(
        2, ge=1, description="User SQL queries one API token may run at once (429 beyond); the operator's token has "
                             "threads of its own, so its queries never wait behind other tokens'.")
    auth: Literal["auto", "required", "off"] = Field(
        "auto", description="API tokens: 'auto' requires them unless the service binds loopback only; 'required'; 'off'.")
    admin_token: str | None = Field(
        None, repr=False, description="The operator's admin token (a secret of your choosing, e.g. from a secret store, "
                                      f"at least {MIN_ADMIN_TOKEN_CHARS} characters); use it to create the others with "
                                      "`annotate token create`.")
    auth_failures_per_minute: int = Field(
        20, ge=1, description="Invalid API tokens one client address may send in a minute before it gets 429 (back-off).")
    gold_max_annotators: int = Field(
        100, ge=1, description="Distinct people whose gold labels one job may hold (agreement compares every pair).")
    max_active_jobs_per_token: int = Field(
        8, ge=1, description="Queued or running jobs one API token may have at once (the operator's token is exempt).")
    log_level: str = Field("WARNING", description="Log level of the service's structured (JSON) logs.")

    @field_validator("admin_token")
    @classmethod
    def _strong_admin_token(cls, token: str | None) -> str | None:
        """The operator's token opens everything and is never rotated by the service: refuse a guessable one."""
        if token is not None and (len(token) < MIN_ADMIN_TOKEN_CHARS or len(set(token)) < 8):
            raise ValueError(f"ANNOTATE_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_CHARS} characters with at least 8 "
                             "different ones; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        return token

    @field_validator("embedding_model_dir")
    @classmethod
    def _a_checkpoint(cls, path: Path | None) -> Path | None:
        """A missing or foreign directory is refused at start, not at the first job that embeds."""
        if path is not None and not (path / "config.json").is_file():
            raise ValueError(f"ANNOTATE_EMBEDDING_MODEL_DIR={path} is not a sentence-transformers checkpoint directory "
                             "(no config.json there)")
        return path

    @model_validator(mode="after")
    def _data_outside_inputs(self) -> Settings:
        """A caller names sources under the input dir: were the data dir there, a job could read the service's own
        files (other jobs' Parquet shards and exports) back as its documents."""
        if self.data_dir.resolve().is_relative_to(self.input_dir.resolve()):
            raise ValueError(f"ANNOTATE_DATA_DIR={self.data_dir} lies inside ANNOTATE_INPUT_DIR={self.input_dir}, "
                             "where callers name job sources; give the data or the inputs a directory of their own")
        return self

    @property
    def db_path(self) -> Path:
        """The DuckDB file inside the data dir."""
        return self.data_dir / "annotate.duckdb"

    @property
    def export_dir(self) -> Path:
        """The only directory user SQL may read files from (Parquet exports)."""
        return self.data_dir / "exports"

    @property
    def download_dir(self) -> Path:
        """Where downloads (a job's labels as Parquet, a student's archive) are built, then deleted once sent."""
        return self.data_dir / "downloads"
