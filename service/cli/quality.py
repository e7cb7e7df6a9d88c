"""``annotate gold …``, ``report``, ``calibrate``, ``estimate``, ``audit`` and ``aggregate``: label quality over HTTP."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import typer
from rich.table import Table

from service.cli.common import URL, call, console, errors, fail
from service.labelling.aggregation import METHODS
from service.vocabulary import IssueKind, SamplingDesign

gold_app = typer.Typer(help="Gold standard: draw a sample, export it for people, import their labels.",
                       no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print JSON.")
STORED = typer.Option(False, "--stored", help="Print the last computed answer (a read-scope token suffices) instead "
                                              "of computing it now (write scope).")


ExportFormat = Literal["csv", "labelstudio"]  # the files `gold export` writes (GoldFormat's file formats)


def _pct(value) -> str:
    """A share as a percentage, or a dash."""
    return "–" if value is None else f"{value:.1%}"


def _interval(entry: dict | None) -> str:
    """estimate [low, high] of an interval dict."""
    if not entry:
        return "–"
    return f"{entry['estimate']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _print(body, as_json: bool) -> bool:
    """Print JSON and say so, when asked."""
    if as_json:
        sys.stdout.write(json.dumps(body) + "\n")
    return as_json


@gold_app.command("sample")
def gold_sample(job_id: str, size: int = typer.Option(200, min=1, help="Documents to draw."),
                design: SamplingDesign = typer.Option("random", help="random, stratified (by predicted label) or "
                                                             "uncertainty (over-weights low confidence)."),
                seed: int = 0, replace: bool = typer.Option(False, help="Replace an existing sample."),
                url: str = URL) -> None:
    """Draw a gold sample of a finished job; each document's inclusion probability is kept."""
    body = call("POST", f"{url}/v1/jobs/{job_id}/gold-sample",
                json={"size": size, "design": design, "seed": seed, "replace": replace}).json()
    strata = ", ".join(f"{k} {v}" for k, v in body["by_predicted_label"].items())
    console.print(f"drew {body['size']} of {body['population']} documents ({body['design']}): {strata}",
                  highlight=False)


@gold_app.command("export")
def gold_export(job_id: str, file: Path, format: ExportFormat = typer.Option("csv", help="csv or labelstudio."),
                url: str = URL) -> None:
    """Write the sample for people to label: a CSV to fill in, or Label Studio tasks (+ FILE.xml interface)."""
    response = call("GET", f"{url}/v1/jobs/{job_id}/gold-sample", params={"format": format})
    if format == "csv":
        file.write_text(response.text, encoding="utf-8")
        console.print(f"wrote {file}: fill in the label column (and annotator), then `annotate gold import`")
        return
    body = response.json()
    file.write_text(json.dumps(body["tasks"], indent=1), encoding="utf-8")
    config = file.with_suffix(".xml")
    config.write_text(body["label_config"], encoding="utf-8")
    console.print(f"wrote {file} ({len(body['tasks'])} tasks) and the labelling interface {config}")


@gold_app.command("import")
def gold_import(job_id: str, file: Path,
                annotator: str = typer.Option(None, help="Who labelled, where the file does not say."),
                url: str = URL) -> None:
    """Send human labels: the filled-in CSV, or a Label Studio JSON export."""
    if not file.exists():
        fail(f"no such file: {file}")
    kind = "text/csv" if file.suffix.lower() == ".csv" else "application/json"
    body = call("POST", f"{url}/v1/jobs/{job_id}/gold", content=file.read_bytes(), headers={"content-type": kind},
                params={"annotator": annotator} if annotator else None).json()
    console.print(f"stored {body['stored']} labels; {body['labelled']} of {body['sampled']} sampled documents "
                  "have a gold label", highlight=False)


def report(job_id: str, url: str = URL, as_json: bool = JSON, stored: bool = STORED) -> None:
    """Quality against the gold sample: accuracy, per-label F1, calibration, selective accuracy, agreement."""
    body = (call("GET", f"{url}/v1/jobs/{job_id}/report") if stored else
            call("POST", f"{url}/v1/jobs/{job_id}/report", timeout=300)).json()
    if _print(body, as_json):
        return
    console.print(f"gold documents {body['n']} · accuracy {_interval(body['accuracy'])} · coverage "
                  f"{_pct(body['coverage'])} · top-label accuracy {_interval(body['top_label_accuracy'])} · ECE "
                  f"{body['ece']:.3f} · kappa {body['kappa'] if body['kappa'] is None else round(body['kappa'], 3)}",
                  highlight=False)
    if body["sample"].get("warning"):
        errors.print(body["sample"]["warning"])
    table = Table("label", "precision", "recall", "F1", "gold n")
    for row in body["per_label"]:
        table.add_row(row["label"], _pct(row["precision"]), _pct(row["recall"]), _pct(row["f1"]), str(row["support"]))
    console.print(table)
    table = Table("keep most confident", "confidence ≥", "accuracy")
    for row in body["selective"]:
        table.add_row(_pct(row["coverage"]), "–" if row["threshold"] is None else f"{row['threshold']:.3f}",
                      _pct(row["accuracy"]))
    console.print(table)
    for entry in body.get("annotators", []):
        console.print(f"annotator {entry['name']}: accuracy {_pct(entry['accuracy'])}, coverage "
                      f"{_pct(entry['coverage'])}", highlight=False)
    for entry in body["abstentions"]:
        console.print(f"abstained ({entry['reason']}): {entry['n']} gold documents, really "
                      f"{entry['gold_labels']}", highlight=False)


def calibrate(job_id: str, alpha: float = typer.Option(0.1, min=0.001, max=0.999, help="Miss rate allowed."),
              target_accuracy: float = typer.Option(0.9, help="Accuracy wanted on the documents kept."),
              url: str = URL, as_json: bool = JSON) -> None:
    """Conformal candidate sets (coverage ≥ 1−alpha) and an abstention threshold for a target accuracy."""
    body = call("POST", f"{url}/v1/jobs/{job_id}/calibrate",
                json={"alpha": alpha, "target_accuracy": target_accuracy}).json()
    if _print(body, as_json):
        return
    console.print(f"candidate sets: labels with probability ≥ {body['threshold']:.4f}; held-out coverage "
                  f"{_pct(body['coverage'])} (target {_pct(1 - alpha)}), mean set size {body['avg_set_size']:.2f}",
                  highlight=False)
    abstain = body["abstention"]
    if abstain["threshold"] is None:
        console.print(f"no confidence threshold reaches {_pct(target_accuracy)} accuracy on the gold sample")
    else:
        console.print(f"abstain below confidence {abstain['threshold']:.4f}: keeps {_pct(abstain['coverage'])} at "
                      f"{_pct(abstain['accuracy'])} accuracy", highlight=False)


def estimate(job_id: str,
             outcome: str = typer.Option(None, help="Regression: the label whose indicator is the outcome."),
             covariates: str = typer.Option(None, help="Regression: comma-separated meta fields or text_chars."),
             model: str = typer.Option("linear", help="Regression: linear or logistic."),
             level: float = 0.95, url: str = URL, as_json: bool = JSON) -> None:
    """Label shares (or a regression on metadata) by DSL, next to the naive and gold-only estimates."""
    request = {"target": "proportions", "level": level}
    if outcome:
        request.update(target="regression", outcome=outcome, model=model,
                       covariates=[c.strip() for c in (covariates or "").split(",") if c.strip()])
    body = call("POST", f"{url}/v1/jobs/{job_id}/estimate", json=request, timeout=300).json()
    if _print(body, as_json):
        return
    table = Table("label" if not outcome else "coefficient", "DSL", "naive (LLM as truth)", "gold only")
    for row in body["estimates"]:
        table.add_row(row.get("label") or row.get("name"), _interval(row["dsl"]), _interval(row["naive"]),
                      _interval(row["gold_only"]))
    console.print(table)


def audit(job_id: str, kind: IssueKind = typer.Option("gold", help="gold (human labels) or llm (the job's labels)."),
          limit: int = 20, url: str = URL, as_json: bool = JSON, stored: bool = STORED) -> None:
    """Likely label errors, most suspicious first (cleanlab confident learning plus disagreement)."""
    body = (call("GET", f"{url}/v1/jobs/{job_id}/label-issues", params={"kind": kind, "limit": limit}) if stored else
            call("POST", f"{url}/v1/jobs/{job_id}/label-issues", json={"kind": kind, "limit": limit},
                 timeout=600)).json()
    if _print(body, as_json):
        return
    table = Table("rank", "doc_id", "label", "suggested", "quality", "disagreement", "issue")
    for row in body["rows"]:
        table.add_row(str(row["rank"]), row["doc_id"], row["given_label"], row["suggested_label"],
                      f"{row['quality']:.3f}", f"{row['disagreement']:.2f}", "yes" if row["is_issue"] else "")
    console.print(table)
    console.print(f"{body['issues']} likely errors among {body['checked']} labels", highlight=False)


def aggregate(job_id: str, method: str = typer.Argument(..., help=", ".join(METHODS) + "."),
              url: str = URL) -> None:
    """Recompute a several-annotator job's labels with another aggregation method."""
    body = call("POST", f"{url}/v1/jobs/{job_id}/aggregate", json={"method": method}, timeout=AGGREGATE_TIMEOUT_S).json()
    console.print(f"job {job_id} labels now aggregated by {body['aggregation']}")


AGGREGATE_TIMEOUT_S = 3600  # `refined` reads every text with the encoder and the LLM: minutes for a large job


def register_quality_commands(app: typer.Typer) -> None:
    """Add the gold sub-commands and the quality commands to the CLI."""
    app.add_typer(gold_app, name="gold")
    for command in (report, calibrate, estimate, audit, aggregate):
        app.command()(command)
