"""The gold standard: drawing a sample for people to label, and their labels in and out.

A sample is drawn once a job has finished, from its labelled documents (failed ones
cannot be compared), under one design (``statistics.DESIGNS``): ``random``,
``stratified`` by the predicted label, or ``uncertainty`` (Poisson sampling that
over-weights low-confidence documents). Each sampled document's inclusion probability
is stored: every statistic weights gold documents by 1/π, so the design never biases them.

Human labels arrive as JSON, as a CSV a person filled in (``doc_id,label[,annotator]``,
the file ``annotate gold export`` writes), or as a Label Studio JSON export. A label
must be one of the taxonomy's labels or ``none_of_these`` (the document fits no label).
Several people may label the same document; the gold label is their most frequent
answer (the ``gold`` view in DuckDB; ties go to the earliest).

Exports are opened in spreadsheets and in Label Studio, where nothing a document or a label
name holds may act: a CSV cell that a spreadsheet would run as a formula is escaped
(``_csv_cell``; the import undoes it, so an exported doc_id comes back as the same document),
and the Label Studio config quotes label names as XML attribute values.
"""

from __future__ import annotations

import csv
import io
import json
from xml.sax.saxutils import quoteattr

import numpy as np

from service.errors import Conflict, InvalidInput
from service.labelling.labeller import options_of
from service.quality.sampling import draw_sample
from service.store import Store
from service.taxonomy import NONE_LABEL

CSV_COLUMNS = ("doc_id", "text", "label", "annotator")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP's list of cell starts a spreadsheet may evaluate


def draw(store: Store, job_id: str, *, size: int, design: str, seed: int, replace: bool) -> dict:
    """Draw and store a gold sample of a finished job; returns what was drawn."""
    job = store.jobs.get(job_id)
    if job.status != "succeeded":
        raise Conflict(f"job {job_id} is {job.status}; draw a gold sample once it has succeeded, so that every "
                       "document had its chance of being drawn")
    taxonomy = store.taxonomies.get(job.taxonomy, job.taxonomy_version).taxonomy
    if taxonomy.multi_label:
        raise InvalidInput(f"job {job_id} uses the multi-label taxonomy {taxonomy.name!r}; gold samples and their "
                           "statistics cover single-label taxonomies")
    population = store.quality.population(job_id, list(options_of(taxonomy)))
    if size > len(population["doc_id"]):
        raise InvalidInput(f"size: {size} is more than the job's {len(population['doc_id'])} labelled documents")
    confidence = population["probs"].max(axis=1) if len(population["doc_id"]) else np.zeros(0)
    try:
        chosen, pi = draw_sample(predicted=population["label"], confidence=confidence, size=size, design=design,
                                 seed=seed)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    rows = [(population["doc_id"][i], population["label"][i] or "(abstained)", float(p)) for i, p in zip(chosen, pi)]
    store.quality.put_sample(job_id, design=design, seed=seed, rows=rows, replace=replace)
    strata: dict[str, int] = {}
    for _, stratum, _ in rows:
        strata[stratum] = strata.get(stratum, 0) + 1
    return {"job_id": job_id, "design": design, "seed": seed, "size": len(rows), "population": len(population["doc_id"]),
            "inclusion_prob": {"min": float(pi.min()), "max": float(pi.max())} if len(pi) else None,
            "by_predicted_label": strata}


def put_labels(store: Store, job_id: str, rows: list[tuple[str, str, str]], *, max_annotators: int) -> dict:
    """Check human labels (doc_id, annotator, label) against the taxonomy and store them."""
    job = store.jobs.get(job_id)
    taxonomy = store.taxonomies.get(job.taxonomy, job.taxonomy_version).taxonomy
    allowed = set(taxonomy.label_names()) | {NONE_LABEL}
    bad = [(i, label) for i, (_, _, label) in enumerate(rows) if label not in allowed]
    if bad:
        listed = ", ".join(f"row {i + 1}: {label!r}" for i, label in bad[:5])
        raise InvalidInput(f"{len(bad)} label(s) are not in taxonomy {taxonomy.name!r} ({listed}); use one of "
                           f"{', '.join(sorted(allowed))}")
    stored = store.quality.put_labels(job_id, rows, max_annotators=max_annotators)
    sample = store.quality.sample(job_id)
    return {"job_id": job_id, "stored": stored, "sampled": len(sample),
            "labelled": sum(r["gold_label"] is not None for r in sample)}


def parse_upload(body: bytes, content_type: str, default_annotator: str | None) -> list[tuple[str, str, str]]:
    """(doc_id, annotator, label) rows from a JSON body, a CSV file or a Label Studio export."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"gold labels: not valid UTF-8 at byte {exc.start}") from exc
    if "csv" in content_type:
        return _from_csv(text, default_annotator)
    try:
        data = json.loads(text)
    except RecursionError as exc:
        raise InvalidInput("gold labels: JSON nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"gold labels: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; send "
                           "JSON, or a CSV with Content-Type text/csv") from exc
    if isinstance(data, list):
        return _from_label_studio(data, default_annotator)
    if not isinstance(data, dict) or not isinstance(data.get("labels"), list):
        raise InvalidInput('gold labels: expected {"annotator": ..., "labels": [{"doc_id": ..., "label": ...}]}, '
                           "a CSV, or a Label Studio JSON export (a list of tasks)")
    annotator = data.get("annotator") or default_annotator
    return [_row(f"labels[{i}]", item.get("doc_id") if isinstance(item, dict) else None,
                 item.get("label") if isinstance(item, dict) else None,
                 (item.get("annotator") if isinstance(item, dict) else None) or annotator)
            for i, item in enumerate(data["labels"])]


def _row(where: str, doc_id: object, label: object, annotator: object) -> tuple[str, str, str]:
    """One checked (doc_id, annotator, label) row."""
    if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or str(doc_id) == "":
        raise InvalidInput(f"{where}: missing 'doc_id'")
    if not isinstance(label, str) or not label.strip():
        raise InvalidInput(f"{where}: missing 'label' for doc_id {doc_id!r}")
    if not isinstance(annotator, (str, int)) or str(annotator).strip() == "":
        raise InvalidInput(f"{where}: no annotator: name the person who labelled (an 'annotator' field, column or "
                           "the ?annotator= parameter)")
    return str(doc_id), str(annotator).strip(), label.strip()


def _from_csv(text: str, default_annotator: str | None) -> list[tuple[str, str, str]]:
    """Rows of a filled-in CSV; rows left without a label are skipped (not labelled yet)."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # an exported text may pass the 128 kB default
    reader = csv.DictReader(io.StringIO(text, newline=""))  # the csv module reads \r, \n and \r\n line ends itself
    missing = {"doc_id", "label"} - set(reader.fieldnames or [])
    if missing:
        raise InvalidInput(f"gold CSV: missing column(s) {', '.join(sorted(missing))}; the header must name "
                           f"doc_id and label (annotator optional), as `annotate gold export` writes")
    return [_row(f"CSV line {reader.line_num}", _csv_value(row["doc_id"]), _csv_value(row["label"]),
                 _csv_value(row.get("annotator")) or default_annotator)
            for row in reader if (row.get("label") or "").strip()]


def _from_label_studio(tasks: list, default_annotator: str | None) -> list[tuple[str, str, str]]:
    """Rows of a Label Studio JSON export: each annotation's first chosen label, by who completed it."""
    rows = []
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise InvalidInput(f"Label Studio export: task [{i}] has no 'data' object")
        for j, annotation in enumerate(_objects(task.get("annotations"), f"task [{i}] 'annotations'")):
            where = f"task [{i}] annotation [{j}]"
            choices = [c for k, r in enumerate(_objects(annotation.get("result"), f"{where} 'result'"))
                       for c in _listed(_object(r.get("value"), f"{where} result [{k}] 'value'").get("choices"),
                                        f"{where} result [{k}] 'choices'")]
            if annotation.get("was_cancelled") or not choices:
                continue
            person = annotation.get("completed_by")
            person = person.get("email") or person.get("id") if isinstance(person, dict) else person
            rows.append(_row(f"Label Studio task [{i}] annotation [{j}]", task["data"].get("doc_id"), choices[0],
                             person if person not in (None, "") else default_annotator))
    return rows


def _listed(value: object, where: str) -> list:
    """A Label Studio field that must be a list (absent: empty)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidInput(f"Label Studio export: {where} must be a list, got {type(value).__name__}")
    return value


def _object(value: object, where: str) -> dict:
    """A Label Studio field that must be an object (absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"Label Studio export: {where} must be an object, got {type(value).__name__}")
    return value


def _objects(value: object, where: str) -> list[dict]:
    """A Label Studio field that must be a list of objects (absent: empty)."""
    items = _listed(value, where)
    return [_object(item, f"{where} [{k}]") for k, item in enumerate(items)]


def to_csv(sample: list[dict]) -> str:
    """A CSV for a person to fill in: doc_id, text, and empty label and annotator columns."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for row in sample:
        writer.writerow([_csv_cell(row["doc_id"]), _csv_cell(row["text"]), "", ""])
    return out.getvalue()


def _csv_cell(value: object) -> str:
    """A cell a spreadsheet shows as text, never runs as a formula (OWASP's CSV-injection advice).

    A cell starting with ``= + - @``, a tab or a carriage return gets a leading ``'``; so does
    one that already starts with ``'``, so that ``_csv_value`` undoes exactly what was added. A
    spreadsheet that drops the ``'`` when it saves gives back the bare value, which is kept."""
    text = str(value)
    return "'" + text if text.startswith((*FORMULA_STARTS, "'")) else text


def _csv_value(cell: str | None) -> str | None:
    """The value ``_csv_cell`` escaped: one leading ``'`` dropped where the export added it."""
    if cell is not None and cell.startswith("'") and cell[1:].startswith((*FORMULA_STARTS, "'")):
        return cell[1:]
    return cell


def to_label_studio(sample: list[dict]) -> list[dict]:
    """Label Studio tasks (import them into a project that uses ``label_studio_config``)."""
    return [{"id": i + 1, "data": {"doc_id": row["doc_id"], "text": row["text"]}} for i, row in enumerate(sample)]


def label_studio_config(labels: list[str]) -> str:
    """A Label Studio labelling interface: the text and one choice per label (names escaped as XML attributes)."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in [*labels, NONE_LABEL])
    return (f'<View>\n  <Text name="text" value="$text"/>\n  <Choices name="label" toName="text" choice="single">\n'
            f"{choices}\n  </Choices>\n</View>\n")
