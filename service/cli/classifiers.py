"""``annotate distill`` and ``annotate classifiers …``: students over HTTP."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from rich.table import Table

from service.cli.common import URL, call, console, errors, fail
from service.vocabulary import StudentKind

classifiers_app = typer.Typer(help="Distilled classifiers: list, inspect, predict, export.", no_args_is_help=True)


def distill(job: list[str] = typer.Option(..., "--job", "-j", help="A finished job to learn from (repeatable)."),
            kind: StudentKind = typer.Option("minilm", help="ngram, static, minilm or finetune."),
            name: str = typer.Option(None, help="Students of one name are versioned [default: TAXONOMY-KIND]."),
            targets: str = typer.Option(None, help="hard, soft or candidates [default: chosen on validation]."),
            weighting: str = typer.Option(None, help="none or confidence [default: chosen on validation]."),
            abstained: str = typer.Option("exclude", help="exclude abstained documents, or teach them as none."),
            epochs: int = typer.Option(2, help="finetune: passes over the training documents."),
            wait: bool = typer.Option(True, help="Wait for the training and print its report."),
            url: str = URL) -> None:
    """Train a student classifier from jobs' LLM labels; prints its id and, when done, its metrics."""
    body = {"jobs": job, "kind": kind, "name": name, "targets": targets, "weighting": weighting,
            "abstained": abstained, "epochs": epochs}
    started = call("POST", f"{url}/v1/classifiers", json={k: v for k, v in body.items() if v is not None}).json()
    console.print(f"classifier {started['classifier_id']}: {started['name']} v{started['version']} training on "
                  f"{started['documents']} documents", highlight=False)
    if not wait:
        return
    with console.status("training"):
        while (row := call("GET", f"{url}/v1/classifiers/{started['classifier_id']}").json())["status"] == "training":
            time.sleep(1)
    if row["status"] != "ready":
        fail(f"training failed: {row['error']}")
    _print_report(row)


def _print_report(row: dict) -> None:
    """A student's options and metrics as tables."""
    report = row["report"]
    options = report["options"]
    console.print(f"{row['name']} v{row['version']} ({row['kind']}): trained on {report['n_train']} documents, "
                  f"targets={options['targets']} weighting={options['weighting']}", highlight=False)
    if options["tried"]:
        table = Table("targets", "weighting", "validation agreement with the LLM")
        for entry in options["tried"]:
            table.add_row(entry["targets"], entry["weighting"], f"{entry['validation_agreement']:.1%}")
        console.print(table)
    table = Table("evaluated on", "n", "accuracy", "macro-F1", "ECE")
    for title, key in (("held-out LLM labels (agreement)", "llm_holdout"), ("gold sample", "gold")):
        metrics = report.get(key)
        if metrics and metrics["n"]:
            table.add_row(title, str(metrics["n"]), f"{metrics['accuracy']:.1%}", f"{metrics['macro_f1']:.3f}",
                          f"{metrics['ece']:.3f}")
    console.print(table)
    cost = report["cost"]
    console.print(f"{cost['docs_per_s'] or 0:,.0f} docs/s · p50 {cost['p50_latency_ms'] or 0:.2f} ms · "
                  f"{report['size_bytes'] / 2**20:.1f} MiB on disk", highlight=False)


@classifiers_app.command("list")
def classifiers_list(url: str = URL) -> None:
    """Every student, newest first."""
    table = Table("id", "name", "version", "kind", "taxonomy", "status", "MiB")
    for row in call("GET", f"{url}/v1/classifiers").json():
        table.add_row(row["classifier_id"], row["name"], str(row["version"]), row["kind"], row["taxonomy"],
                      row["status"], f"{(row['size_bytes'] or 0) / 2**20:.1f}")
    console.print(table)


@classifiers_app.command("show")
def classifiers_show(ref: str, url: str = URL, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """A student's options and metrics (by id, or the newest ready version of a name)."""
    row = call("GET", f"{url}/v1/classifiers/{ref}").json()
    if as_json:
        sys.stdout.write(json.dumps(row) + "\n")
    elif row["status"] == "ready":
        _print_report(row)
    else:
        errors.print(f"{row['classifier_id']} is {row['status']} {row.get('error') or ''}")


@classifiers_app.command("predict")
def classifiers_predict(ref: str, texts: list[str], url: str = URL) -> None:
    """Label texts with a student; prints one JSON line per text."""
    body = call("POST", f"{url}/v1/classifiers/{ref}/predict", json={"texts": texts}).json()
    for text, label in zip(texts, body["labels"]):
        sys.stdout.write(json.dumps({"text": text, **label}) + "\n")


@classifiers_app.command("export")
def classifiers_export(ref: str, file: Path, url: str = URL) -> None:
    """Download a student as .tar.gz (model.joblib, or a transformers model directory, and meta.json)."""
    file.write_bytes(call("GET", f"{url}/v1/classifiers/{ref}/export", timeout=600).content)
    console.print(f"wrote {file}")


def register_classifier_commands(app: typer.Typer) -> None:
    """Add `distill` and the `classifiers` sub-commands to the CLI."""
    app.command()(distill)
    app.add_typer(classifiers_app, name="classifiers")
