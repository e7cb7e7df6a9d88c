"""Batch jobs over large corpora through Ray Data: shards in, Parquet shards out, resumable per shard.

    POST /v1/jobs {"source": ..., "mode": "batch"}
        │ plan_shards: a cheap scan cuts the source into shards of ``shard_size`` rows
        │ (JSONL: byte ranges; Parquet: row-group slices); the plan is stored with the job
        ▼
    Ray Data: from_items(pending shards).map(label_shard)   ── tasks anywhere in the cluster
        │ each task reads only its shard, labels it on the model deployment
        │ (``ModelServer.score_many``, one call per ``batch_size`` documents, all in flight)
        │ and writes ``exports/shards/<job>/part-<n>.parquet`` atomically
        ▼
    BatchRunner (in the ingress, the DuckDB owner) registers each finished shard:
    its documents and annotations are loaded into the store in one transaction.

Shard boundaries come from the plan, not from Ray Data's block layout, so they are the
same after a restart: the runner skips registered shards, registers shard files that
were written but not yet registered, and relabels only the rest. Memory stays bounded
by the shard size whatever the corpus size. Sources are local paths under
ANNOTATE_INPUT_DIR or, with ANNOTATE_ALLOW_REMOTE_SOURCES, object-store URIs (s3://,
gs://) read through pyarrow's filesystems. On a multi-node cluster the data dir must be
a shared filesystem, since tasks write the shards that the ingress reads.
Long documents are read as the job's ``long_documents`` says (truncate, head_tail or
chunk: all windows of a call's documents go to the deployment together); ``reject``
needs the documents at submission, so ``service.api.jobs`` refuses it in batch mode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from service.documents import check_record, local_source
from service.errors import AnnotateError, InvalidInput, cause_of
from service.files import atomic_path
from service.labelling.labeller import Labeller, failed
from service.labelling.prompts import load_template
from service.labelling.scoring import annotate_texts
from service.settings import Settings
from service.store import Store
from service.store.annotations import annotation_row
from service.store.database import ANNOTATION_SCHEMA
from service.work.panels import annotation_keys

log = logging.getLogger(__name__)

SHARD_SCHEMA = pa.schema(list(ANNOTATION_SCHEMA) + [pa.field("position", pa.int64()), pa.field("text", pa.string()),
                                                     pa.field("meta", pa.string())])
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://")  # not hdfs://: its host and port are the caller's (SSRF)
MAX_SHARDS = 100_000  # shards one batch job may plan: each is a Ray task and a row of the plan the job keeps


def open_source(source: str, settings: Settings) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path, kind) of a batch source; local paths must lie under the input dir."""
    if source.startswith(REMOTE_SCHEMES):
        if not settings.allow_remote_sources:
            raise InvalidInput(f"source {source!r} is remote; set ANNOTATE_ALLOW_REMOTE_SOURCES=true to allow it")
        if any(c in source for c in "?#@"):  # ?endpoint_override=host would send the service's keys there (SSRF)
            raise InvalidInput(f"source {source!r}: remote sources take no query, fragment or user part; the "
                               "service's own configuration chooses endpoints and credentials")
        try:
            filesystem, path = pafs.FileSystem.from_uri(source)
        except ValueError as exc:  # ArrowInvalid: not a URI (a NUL byte, a space, ...)
            raise InvalidInput(f"source {source!r}: not a URI pyarrow can parse ({exc})") from exc
    else:
        filesystem, path = pafs.LocalFileSystem(), str(local_source(settings.input_dir, source))
    kind = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}.get(Path(path).suffix.lower())
    if kind is None:
        raise InvalidInput(f"source {source!r}: batch jobs read .jsonl (one JSON object a line) or .parquet files")
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise InvalidInput(f"source {source!r}: no such file")
    return filesystem, path, kind


def source_stamp(filesystem: pafs.FileSystem, path: str) -> dict:
    """Size and modification time of a source, to notice a file replaced under a planned job."""
    info = filesystem.get_file_info(path)
    return {"size": info.size, "mtime": None if info.mtime is None else info.mtime.isoformat()}


def plan_shards(filesystem: pafs.FileSystem, path: str, kind: str, shard_size: int) -> Iterator[dict]:
    """Cut a source into shards of at most ``shard_size`` rows, each readable on its own."""
    first_row = 0
    if kind == "parquet":
        metadata = pq.ParquetFile(filesystem.open_input_file(path)).metadata
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            for offset in range(0, rows, shard_size):
                length = min(shard_size, rows - offset)
                yield {"first_row": first_row, "rows": length, "group": group, "offset": offset}
                first_row += length
        return
    with filesystem.open_input_stream(path) as stream:
        start = position = rows = 0
        for line in _lines(stream):
            position += len(line)
            rows += bool(line.strip())  # blank lines are skipped when read, so they are not counted
            if rows == shard_size:
                yield {"first_row": first_row, "rows": rows, "start": start, "stop": position}
                first_row, start, rows = first_row + rows, position, 0
        if rows:
            yield {"first_row": first_row, "rows": rows, "start": start, "stop": position}


def _lines(stream, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a byte stream (each with its newline), in bounded memory."""
    pending = b""
    while data := stream.read(chunk):
        pending += data
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line + b"\n"
    if pending:
        yield pending


def read_shard(filesystem: pafs.FileSystem, path: str, kind: str, shard: dict, *, text_field: str,
               id_field: str) -> list[tuple[int, object]]:
    """(row number, record or error text) for each row of one shard."""
    first = shard["first_row"]
    if kind == "parquet":
        table = pq.ParquetFile(filesystem.open_input_file(path)).read_row_group(shard["group"])
        return list(enumerate(table.slice(shard["offset"], shard["rows"]).to_pylist(), start=first + 1))
    with filesystem.open_input_file(path) as handle:
        handle.seek(shard["start"])
        raw = handle.read(shard["stop"] - shard["start"])
    records: list[tuple[int, object]] = []
    number = first
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        number += 1
        try:
            records.append((number, json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            records.append((number, f"invalid JSON: {exc}"))
    return records


def label_shard(shard: dict, job: dict) -> dict:
    """Ray Data task: read one shard, label it on the model deployment, write its Parquet file."""
    from ray import serve

    settings = Settings(**job["settings"])
    filesystem, path, kind = open_source(job["source"], settings)
    labeller = Labeller(job["taxonomy"], job["taxonomy_version"], load_template(job["template"]), job["engine"],
                        settings.model_input_chars, model=job["model"], long_documents=job["long_documents"],
                        tuning=job["tuning"])
    handle = serve.get_deployment_handle(job["deployment"], app_name=job["app_name"])
    started = time.perf_counter()
    documents, problems = [], {}
    for number, record in read_shard(filesystem, path, kind, shard, text_field=job["text_field"],
                                     id_field=job["id_field"]):
        where = f"{Path(path).name} {'row' if kind == 'parquet' else 'line'} {number}"
        try:
            if isinstance(record, str):
                raise InvalidInput(f"{where}: {record}")
            documents.append((number, check_record(where, record, number, text_field=job["text_field"],
                                                   id_field=job["id_field"], max_chars=settings.max_document_chars)))
        except AnnotateError as exc:
            problems[number] = str(exc)
            given = record.get(job["id_field"]) if isinstance(record, dict) else None
            doc_id = str(given) if isinstance(given, (str, int)) else f"#{number}"
            documents.append((number, {"doc_id": doc_id, "text": "", "text_hash": "", "meta": {}}))
    annotations = asyncio.run(_annotate(labeller, handle, [d["text"] for n, d in documents if n not in problems],
                                        settings.batch_size))
    per_doc_ms = 1000 * (time.perf_counter() - started) / max(len(documents), 1)
    keys = annotation_keys(job["job_id"], labeller)
    outcomes = iter(annotations)
    rows = []
    for number, doc in documents:
        annotation = failed(problems[number]) if number in problems else next(outcomes)
        row = annotation_row(annotation, doc_id=doc["doc_id"], text_hash=doc["text_hash"], cached=False,
                             latency_ms=per_doc_ms, **keys)
        row.update(position=number - 1, text=doc["text"], meta=json.dumps(doc["meta"]))
        rows.append(row)
    out = Path(job["out_dir"]) / f"part-{shard['shard']:05d}.parquet"
    with atomic_path(out) as partial:  # the registrar never sees a half-written shard
        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), partial)
    return {"shard": shard["shard"], "path": str(out)}


async def _annotate(labeller: Labeller, handle, texts: list[str], batch_size: int) -> list:
    """Annotate texts in ``batch_size`` calls to the model deployment, all in flight together."""

    async def scorer(requests):
        try:
            return await handle.score_many.remote(requests)
        except Exception as exc:  # the engine failed, or the replica is unreachable: each document fails, then is retried
            return [cause_of(exc)] * len(requests)

    chunks = [texts[i: i + batch_size] for i in range(0, len(texts), batch_size)]
    results = await asyncio.gather(*(annotate_texts(labeller, chunk, scorer) for chunk in chunks))
    return [annotation for chunk in results for annotation in chunk]


class BatchRunner:
    """Runs batch jobs' pending shards on Ray Data and registers the finished ones in the store."""

    def __init__(self, store: Store, settings: Settings, deployments: dict[str, str], app_name: str):
        self.store = store
        self.settings = settings
        self.deployments = deployments
        self.app_name = app_name
        self._stopping = threading.Event()

    def plan(self, source: str, shard_size: int | None = None) -> tuple[list[dict], dict]:
        """Validate a source and cut it into numbered shards (before the job is stored); also its stamp."""
        if shard_size is not None and shard_size > self.settings.shard_size:
            raise InvalidInput(f"shard_size {shard_size:,} is over ANNOTATE_SHARD_SIZE ({self.settings.shard_size:,}): "
                               "a job may cut smaller shards, not larger (one shard is one task's memory)")
        filesystem, path, kind = open_source(source, self.settings)
        stamp = source_stamp(filesystem, path)
        size = shard_size or self.settings.shard_size
        try:
            shards = [dict(plan, shard=i) for i, plan in
                      enumerate(islice(plan_shards(filesystem, path, kind, size), MAX_SHARDS + 1))]
        except (pa.ArrowInvalid, OSError) as exc:  # not Parquet, or a damaged footer; pyarrow's message may name a path
            raise InvalidInput(f"source {source!r} cannot be read as {kind}: not a {kind} file, or a damaged one") from exc
        if not shards:
            raise InvalidInput(f"source {source!r} holds no documents")
        if len(shards) > MAX_SHARDS:
            raise InvalidInput(f"source {source!r} cut into shards of {size:,} rows makes more than {MAX_SHARDS:,} "
                               "shards (each a task and a row of the job's plan); give a larger shard_size")
        return shards, stamp

    def stop(self) -> None:
        """Stop registering between shards (service shutdown); the job resumes on restart."""
        self._stopping.set()

    def run(self, job_id: str, labeller: Labeller) -> bool:
        """Label and register every pending shard; False if the job stopped being active first."""
        job = self.store.jobs.get(job_id)
        batch = job.batch
        assert batch is not None  # JobRunner.run hands batch jobs only to the batch runner
        filesystem, path, _ = open_source(batch["source"], self.settings)
        if source_stamp(filesystem, path) != batch.get("stamp"):
            raise InvalidInput(f"source {batch['source']!r} changed since the job was planned "
                               "(size or modification time); submit a new job")
        out_dir = self.settings.export_dir / "shards" / job_id
        out_dir.mkdir(parents=True, exist_ok=True)
        pending = []
        for shard in self.store.jobs.pending_shards(job_id):
            written = out_dir / f"part-{shard['shard']:05d}.parquet"
            if written.exists():  # written before a restart, never registered
                self.store.jobs.register_shard(job_id, shard["shard"], written)
            else:
                pending.append(shard)
        if not pending:
            return True
        task = {"job_id": job_id, "settings": self.settings.model_dump(mode="json"), "source": batch["source"],
                "text_field": batch["text_field"], "id_field": batch["id_field"],
                "taxonomy": labeller.taxonomy, "taxonomy_version": labeller.taxonomy_version,
                "template": labeller.template.name, "engine": labeller.engine, "model": labeller.model,
                "long_documents": labeller.long_documents, "tuning": labeller.tuning,
                "deployment": self.deployments[labeller.model], "app_name": self.app_name, "out_dir": str(out_dir)}
        for result in self._dataset(pending, task).iter_rows():
            if self._stopping.is_set():
                return False
            self.store.jobs.register_shard(job_id, result["shard"], Path(result["path"]))
            if self.store.jobs.state(job_id) != "running":
                return False
        return True

    def _dataset(self, pending: list[dict], task: dict):
        """The Ray Data pipeline over pending shards: one task per shard, a few in flight."""
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # progress is the job's own counters
        return ray.data.from_items(pending, override_num_blocks=len(pending)).map(
            label_shard,  # type: ignore[arg-type]  # ray types fn as one-argument, though fn_kwargs passes it more
            fn_kwargs={"job": task}, compute=ray.data.TaskPoolStrategy(size=self.settings.batch_concurrency),
            num_cpus=self.settings.batch_task_cpus, max_retries=2)
