"""The ``annotate`` command line: runs the service and talks to it over HTTP.

Every command but ``serve``, ``taxonomy validate|induce|diff``, ``models fetch`` and
``settings`` is an HTTP client of a running service (``--url`` or ``ANNOTATE_URL``). ``annotate sql`` opens
the DuckDB file itself, read-only through the same sandbox, when no service is running.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from service.cli.classifiers import register_classifier_commands
from service.cli.common import URL, auth_headers, call, console, error_message, errors, fail
from service.cli.quality import register_quality_commands
from service.cli.tokens import register_token_commands
from service.errors import AnnotateError
from service.settings import Settings
from service.vocabulary import FINAL, AggregationMethod, InductionMethod

app = typer.Typer(help="LLM-driven annotation: taxonomies in YAML, labelling jobs over HTTP, results in DuckDB.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
taxonomy_app = typer.Typer(help="Validate, push, induce and compare taxonomy YAML files.", no_args_is_help=True)
models_app = typer.Typer(help="Models: list the service's, fetch the embedded weights.", no_args_is_help=True)
app.add_typer(taxonomy_app, name="taxonomy")
app.add_typer(models_app, name="models")
@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address [default: 127.0.0.1 or ANNOTATE_HOST]."),
    port: int = typer.Option(None, help="Port [default: 8000 or ANNOTATE_PORT]."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Data directory [default: ./data or ANNOTATE_DATA_DIR]."),
    models_file: Path = typer.Option(None, "--models-file", help="Models config [default: built-in embedded and fake]."),
    model: str = typer.Option(None, help="Default model, a name from the models config."),
) -> None:
    """Start the service (Ray Serve) in the foreground; Ctrl-C or SIGTERM stops it cleanly."""
    from service.serve.server import serve_forever

    overrides: dict[str, Any] = {k: v for k, v in dict(host=host, port=port, data_dir=data_dir, models_file=models_file,
                                                       model=model).items() if v is not None}
    settings = Settings(**overrides)
    try:
        serve_forever(settings, on_ready=lambda line: console.print(line, highlight=False))
    except AnnotateError as exc:
        fail(str(exc))


@taxonomy_app.command("validate")
def taxonomy_validate(file: Path) -> None:
    """Check a taxonomy file; problems are printed as FILE:LINE: FIELD: MESSAGE."""
    from service.taxonomy import advice, load_taxonomy

    try:
        taxonomy = load_taxonomy(file)
    except AnnotateError as exc:
        fail(str(exc))
    console.print(f"{file}: ok — {taxonomy.name}, {len(taxonomy.label_names())} labels, version {taxonomy.content_hash()}")
    for line in advice(taxonomy):
        console.print(f"{file}: advice: {line}", soft_wrap=True)


@taxonomy_app.command("induce")
def taxonomy_induce(
    file: Path,
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the induced taxonomy YAML."),
    name: str = typer.Option(None, help="Taxonomy name [default: the output file's stem]."),
    max_labels: int = typer.Option(8, "--max-labels", "-k", min=2, help="Most labels to induce."),
    sample_size: int = typer.Option(2000, help="Documents sampled from the corpus."),
    report_size: int = typer.Option(200, help="Sample documents the review labels."),
    seed: int = typer.Option(0, help="Sampling and clustering seed."),
    method: InductionMethod = typer.Option("embedding", help="embedding (any model) or llm (TnT-LLM loop, strong models)."),
    allow_none: bool = typer.Option(False, help="Add a none_of_these label (small models overuse it)."),
    base: Path = typer.Option(None, help="An existing taxonomy YAML to extend (proposes additions and merges)."),
    model: str = typer.Option(None, help="Model from ANNOTATE_MODELS_FILE [default: the embedded one]."),
    text_field: str = typer.Option("text", help="Field or column holding the text."),
) -> None:
    """Induce a taxonomy from a .jsonl/.csv/.parquet corpus, here (no service needed); writes YAML and a report."""
    import asyncio

    from service.documents import read_file
    from service.engines import create_engine, load_models
    from service.engines.embeddings import Embedder
    from service.induction.inducer import Inducer, InductionOptions, sample_texts
    from service.labelling.scoring import engine_scorer
    from service.taxonomy import load_taxonomy

    settings = Settings()
    try:
        base_taxonomy = load_taxonomy(base) if base else None
        texts, corpus_size = sample_texts(read_file(file, text_field=text_field, max_chars=settings.max_document_chars),
                                          sample_size, seed)
        models = load_models(settings)
        engine = create_engine(models.models[models.resolve(model)], settings)
        embedder = Embedder(settings.embedding_model_dir, threads=settings.engine_threads)
    except AnnotateError as exc:
        fail(str(exc))
    options = InductionOptions(name=name or out.stem, max_labels=max_labels,
                               report_size=report_size, seed=seed, method=method, allow_none=allow_none)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), console=errors) as bar:
        task = bar.add_task("embedding", total=1.0)
        inducer = Inducer(embedder.embed, engine.generate_json, engine_scorer(engine),
                          engine.info, model_input_chars=settings.model_input_chars, encoder=embedder.identity,
                          progress=lambda stage, fraction: bar.update(task, completed=fraction, description=stage))
        result = asyncio.run(inducer.run(texts, options, source=str(file), base=base_taxonomy, corpus_size=corpus_size))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.yaml, encoding="utf-8")
    _print_report(result.report)
    console.print(f"wrote {out}: {len(result.taxonomy.label_names())} labels; push it with "
                  f"`annotate taxonomy push {out}`", highlight=False)


def _print_report(report: dict) -> None:
    """The review of an induced taxonomy as tables."""
    table = Table("label", "share of sample (clusters)", "share labelled (review)")
    for label, share in report["labelled_shares"].items():
        table.add_row(label, f"{report['sample_shares'].get(label, 0):.1%}", f"{share:.1%}")
    console.print(table)
    none = "" if report["none_share"] is None else f" · none of these {report['none_share']:.1%}"
    other = "?" if report["outlier_share"] is None else f"{report['outlier_share']:.1%}"
    console.print(f"coverage {report['coverage']:.1%} · other (far from every label) {other}"
                  f"{none} · reviewed on {report['report_size']} of {report['sample_size']} sampled documents",
                  highlight=False)
    for pair in report["confusable_pairs"][:5]:
        console.print(f"often confused: {pair['a']} / {pair['b']} ({pair['share']:.1%} of reviewed documents)",
                      highlight=False)


@taxonomy_app.command("diff")
def taxonomy_diff(old: Path, new: Path) -> None:
    """What changed between two taxonomy files: + added, - removed, ~ changed."""
    from service.induction.diff import diff
    from service.taxonomy import load_taxonomy

    try:
        lines = diff(load_taxonomy(old), load_taxonomy(new))
    except AnnotateError as exc:
        fail(str(exc))
    for line in lines or ["no changes"]:
        console.print(line, highlight=False, markup=False)


@taxonomy_app.command("tune")
def taxonomy_tune(
    name: str,
    sample: Path = typer.Option(..., "--sample", "-s", help="A .jsonl/.csv/.parquet sample of the corpus (50-200 "
                                                            "documents; at most 500)."),
    label_field: str = typer.Option("label", help="Field or column with a person's label, where there is one."),
    text_field: str = typer.Option("text", help="Field or column holding the text."),
    model: str = typer.Option(None, help="A model from the service's models config [default: the taxonomy's or "
                                         "service's]."),
    url: str = URL,
) -> None:
    """Choose the taxonomy's prompt on a sample: by accuracy with 20+ labels, else by agreement with the embedder."""
    from service.documents import read_file

    try:
        rows = list(read_file(sample, text_field=text_field, max_chars=Settings().max_document_chars))
    except AnnotateError as exc:
        fail(str(exc))
    labels = [(r["meta"] or {}).get(label_field) for r in rows]
    documents = [{"text": r["text"], "label": None if v in (None, "") else str(v)} for r, v in zip(rows, labels)]
    with console.status(f"labelling {len(documents)} documents with every candidate prompt"):
        body = call("POST", f"{url}/v1/taxonomies/{name}/tune", json={"documents": documents, "model": model},
                    timeout=3600).json()
    table = Table("prompt", "calibration", "agreement with embedding", "mutual information", "top label share",
                  "accuracy", "ms/doc")
    for row in body["candidates"]:
        accuracy = "" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        table.add_row(row["prompt"], row["calibration"], f"{row['agreement']:.3f}", f"{row['mutual_information']:.3f}",
                      f"{row['top_label_share']:.3f}", accuracy, f"{row['ms_per_doc']:.0f}")
    console.print(table)
    crossed = body["cross_fitted_accuracy"]
    console.print(f"chose {body['prompt']} ({body['calibration']} calibration) for {body['taxonomy']} version "
                  f"{body['version']} on {body['model']} by {body['criterion']}"
                  + ("" if crossed is None else f" (cross-fitted accuracy {crossed:.3f})"))
    if not body["informative"]:
        console.print(f"its scores follow the reference no more than chance (p = {body['chance_p_value']:.3f}): "
                      "the default panel weighs this LLM 0 and does not score its prompt")


@taxonomy_app.command("push")
def taxonomy_push(file: Path, url: str = URL) -> None:
    """Validate locally, then store the taxonomy in the service (a changed file becomes a new version)."""
    taxonomy_validate(file)
    body = call("POST", f"{url}/v1/taxonomies", content=file.read_bytes(),
                 headers={"content-type": "application/yaml"}).json()
    state = "new version" if body["created"] else "unchanged"
    console.print(f"pushed {body['name']} version {body['version']} ({state})")


@app.command()
def submit(
    file: Path,
    taxonomy: str = typer.Option(..., "--taxonomy", "-t", help="Name of a pushed taxonomy."),
    text_field: str = typer.Option("text", help="Field or column holding the text."),
    id_field: str = typer.Option("id", help="Field or column holding the document id (default: row number)."),
    model: str = typer.Option(None, help="A model from the service's models config [default: the taxonomy's or service's]."),
    annotator: list[str] = typer.Option(
        None, "--annotator", "-a", help="An annotator, repeatable: [NAME=]llm[:MODEL[:PROMPT]] or [NAME=]embedding "
                                        "(e.g. -a smollm2 -a terse=llm::classify_terse -a embedding)."),
    aggregation: AggregationMethod = typer.Option("dawid_skene", help="How several annotators' votes are combined."),
    wait: bool = typer.Option(True, help="Show a progress bar until the job ends."),
    url: str = URL,
) -> None:
    """Label a .jsonl, .csv or .parquet file with a taxonomy; prints the job id."""
    from service.documents import read_file

    try:
        rows = list(read_file(file, text_field=text_field, id_field=id_field, max_chars=Settings().max_document_chars))
    except AnnotateError as exc:
        fail(str(exc))
    documents = [{"id": r["doc_id"], "text": r["text"], "meta": r["meta"]} for r in rows]
    body = {"taxonomy": taxonomy, "documents": documents, "model": model}
    if annotator:
        body.update(annotators=[_annotator_spec(spec) for spec in annotator], aggregation=aggregation)
    job = call("POST", f"{url}/v1/jobs", json=body, timeout=600).json()
    console.print(f"job {job['job_id']}: {job['total']} documents queued", highlight=False)
    if wait:
        final = _follow(url, job["job_id"], job["total"])
        if final["status"] != "succeeded":
            fail(f"job {job['job_id']} ended {final['status']}: {final.get('error') or ''}")


def _annotator_spec(spec: str) -> dict:
    """Parse [NAME=]llm[:MODEL[:PROMPT]] or [NAME=]embedding; a bare model name means llm:MODEL."""
    name, _, rest = spec.rpartition("=")
    kind, _, tail = rest.partition(":")
    entry: dict[str, str | None]
    if kind == "embedding":
        entry = {"kind": "embedding"}
    elif kind == "llm":
        model, _, prompt = tail.partition(":")
        entry = {"kind": "llm", "model": model or None, "prompt": prompt or None}
    else:
        entry = {"kind": "llm", "model": kind or None, "prompt": tail or None}
    return {**entry, "name": name or None}


def _follow(url: str, job_id: str, total: int) -> dict:
    """Poll a job and draw a progress bar until it ends (every annotator's documents, then aggregation)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[extra]}")]
    with Progress(*columns, console=errors, transient=False) as progress:
        task = progress.add_task(job_id, total=total, extra="")
        while True:
            job = call("GET", f"{url}/v1/jobs/{job_id}").json()
            extra = f"failed {job['failed']} · abstained {job['abstained']} · cached {job['cached']}"
            if len(job["annotators"]) > 1:
                extra = f"{len(job['annotators'])} annotators · " + extra
            progress.update(task, completed=round(job["progress"] * total), extra=extra)
            if job["status"] in FINAL:
                return job
            time.sleep(0.5)


@app.command()
def status(job_id: str, url: str = URL) -> None:
    """Show a job's status and counts."""
    job = call("GET", f"{url}/v1/jobs/{job_id}").json()
    table = Table(show_header=False)
    for key in ("job_id", "status", "taxonomy", "taxonomy_version", "total", "done", "failed", "abstained", "cached",
                "error", "created_at", "finished_at"):
        table.add_row(key, "" if job.get(key) is None else str(job[key]))
    console.print(table)


@app.command()
def sql(query: str, url: str = URL, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Run read-only SQL against the results; prints a table."""
    try:
        result = httpx.post(f"{url}/v1/sql", json={"sql": query}, timeout=120, headers=auth_headers())
    except httpx.ConnectError:
        result = None
    if result is None:
        body = _local_sql(query)
    elif result.status_code >= 400:
        fail(f"{result.status_code}: {error_message(result)}")
    else:
        body = result.json()
    if as_json:
        sys.stdout.write(json.dumps(body) + "\n")
        return
    table = Table(*body["columns"])
    for row in body["rows"]:
        table.add_row(*["NULL" if v is None else json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in row])
    console.print(table)
    if body["truncated"]:
        errors.print(f"(cut at {len(body['rows'])} rows by the {body['truncated_reason']})")


def _local_sql(query: str) -> dict:
    """No service is running: open the DuckDB file here, through the same sandbox."""
    from dataclasses import asdict

    from service.store import Store
    from service.store.sandbox import run_sql

    settings = Settings()
    if not settings.db_path.exists():
        fail(f"no service answers and there is no database at {settings.db_path}")
    try:
        store = Store(settings.db_path, export_dir=settings.export_dir, read_only=True)
        return asdict(run_sql(store.cursor(), query, timeout_s=settings.sql_timeout_s, max_rows=settings.sql_max_rows,
                              max_bytes=settings.sql_max_bytes))
    except AnnotateError as exc:
        fail(str(exc))


@models_app.command("fetch")
def models_fetch() -> None:
    """Convert the packaged SmolLM2 GGUF into the fast-loading cache, distil the static embeddings (run by `make`)."""
    from service.distill.students import fetch_static_model
    from service.engines.embedded import fetch_model

    path = fetch_model(Settings().models_dir)
    console.print(f"embedded model ready at {path}")
    console.print(f"static embeddings for students ready at {fetch_static_model(Settings().models_dir)}")


@models_app.command("list")
def models_list(url: str = URL, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The running service's models with their engines, queue depth and throughput."""
    models = call("GET", f"{url}/v1/models").json()
    if as_json:
        sys.stdout.write(json.dumps(models) + "\n")
        return
    table = Table("name", "engine", "model", "default", "queue", "documents", "mean batch", "docs/s busy")
    for entry in models:
        stats = entry["stats"] or {}
        table.add_row(entry["name"], entry["engine"], entry["model"], "yes" if entry["default"] else "",
                      *[str(stats.get(k, "?")) for k in ("queue_depth", "documents", "mean_batch", "docs_per_busy_s")])
    console.print(table)


@app.command("settings")
def settings_table() -> None:
    """Print every setting with its environment variable, default and meaning (Markdown)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `ANNOTATE_{name.upper()}` | `{field.default}` | {field.description} |"
              for name, field in Settings.model_fields.items()]
    sys.stdout.write("\n".join(lines) + "\n")


register_quality_commands(app)
register_classifier_commands(app)
register_token_commands(app)


def main() -> None:
    """Entry point of the console script."""
    app()
