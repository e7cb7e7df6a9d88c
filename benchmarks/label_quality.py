"""Label quality: three annotators, three aggregations and the gold-sample statistics, checked against every label.

On a seeded subsample of ``../shared/data/rotten_tomatoes.csv`` (fresh / rotten / plot)
and ``../shared/data/sms_spam.csv`` (ham / spam), the real service (`annotate serve`,
a fresh data dir) labels every document with three annotators in one job: the embedded
SmolLM2-135M with the ``classify`` prompt, the same model with ``classify_terse``, and
the MiniLM embedding zero-shot annotator, aggregated by Dawid-Skene. The dataset's own
labels are known for every document, so each number the service estimates from a
gold sample can be set beside the truth on the whole subsample:

- accuracy of each annotator and of each aggregation method (majority vote, weighted
  soft vote, Dawid-Skene, recomputed with POST .../aggregate) on all documents, next
  to the quality report's estimate from the gold sample;
- a gold sample (``--gold`` documents, design ``--design``) labelled with the dataset's
  labels as the "human" (annotator ``dataset``);
- conformal candidate sets for α in 0.05, 0.1, 0.2: the coverage the calibration
  promises and measures on held-out gold, and the coverage realised on every document
  outside the gold sample;
- selective accuracy at 50, 80 and 100% coverage: the report's gold estimate and the
  truth on all documents;
- label shares: DSL, naive and gold-only estimates with their 95% intervals, and
  whether each interval holds the true share of the subsample;
- the learning curve: the job relabelled (aggregation ``refined``) with 0, 25, 50, 100 and
  200 gold labels (a new random gold sample each), accuracy on the documents outside it.

    .venv/bin/python benchmarks/label_quality.py [--docs 1500] [--gold 200] [--seed 0]
        [--design random] [--datasets rotten_tomatoes,sms_spam] [--workdir DIR]

The subsample is the population every estimate is about; three annotators over the full
sets (13,905 and 4,837 rows) take hours on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import _service
import httpx
import numpy as np
from _report import fmt_acc, load_now, machine_facts, print_facts, print_table

from service.quality.metrics import TIE_DECIMALS  # the report's ties: confidences equal to 9 decimals

ROOT = _service.ROOT
DATA = ROOT / ".." / "shared" / "data"
MODELS_YAML = "default: smollm2\nmodels:\n  smollm2: {engine: embedded}\n"
ANNOTATORS = [{"name": "smollm2/classify", "kind": "llm", "model": "smollm2", "prompt": "classify"},
              {"name": "smollm2/classify_terse", "kind": "llm", "model": "smollm2", "prompt": "classify_terse"},
              {"name": "embedding", "kind": "embedding"}]
METHODS = ("majority_vote", "weighted_soft_vote", "dawid_skene")  # dawid_skene last: the job ends on its own method
ALPHAS = (0.05, 0.1, 0.2)
LEARNING_CURVE = (25, 50, 100, 200)  # gold labels the job is relabelled with (those up to --gold)
COVERAGES = (0.5, 0.8, 1.0)
PROGRESS_EVERY_S = 10.0
HOW_TO_READ = (
    "How to read this: every document of the subsample has its dataset label, so \"all docs\" columns are the "
    "truth about the subsample (the population the service's estimates are about), their 95% Wilson intervals say "
    "what the subsample tells about the whole dataset; \"gold\" columns are what the service estimates from the gold "
    "sample alone, as it would with people labelling only those documents. Accuracy counts abstentions and failed "
    "documents as wrong (coverage says how many were answered); the report's gold accuracy is over answered "
    "documents. A conformal row is honest when the coverage realised on documents outside the gold sample is at "
    "least 1 − α (up to noise); a smaller mean set size is better. Selective accuracy keeps the most confident "
    "documents by the aggregated label's confidence, ties kept together, so the coverage reached may exceed the "
    "target. A share interval should hold the true share about 95% of the time; the naive one counts the LLM's "
    "labels as if right, so it holds only when their errors cancel. The dataset labels are taken as the truth, "
    "errors and all.")


@dataclass(frozen=True)
class Dataset:
    """One benchmark dataset: its CSV (columns text, label) and the taxonomy that names its labels."""

    key: str
    csv_name: str
    taxonomy_file: str
    taxonomy: str


DATASETS = {d.key: d for d in (
    Dataset("rotten_tomatoes", "rotten_tomatoes.csv", "rotten-tomatoes.yaml", "rotten-tomatoes"),
    Dataset("sms_spam", "sms_spam.csv", "sms-spam.yaml", "sms-spam"))}




def subsample(path: Path, n: int, seed: int) -> list[dict]:
    """A seeded uniform sample of ``n`` rows (file order kept) as {doc_id, text, label}; doc_id is the row number."""
    if not path.exists():
        sys.exit(f"{path} not found: this benchmark needs ../shared/data (or pass --data-dir)")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    picked = np.sort(np.random.default_rng(seed).choice(len(rows), min(n, len(rows)), replace=False))
    return [{"doc_id": f"row{i:05d}", "text": rows[i]["text"], "label": rows[i]["label"]} for i in picked]






def run_job(client: httpx.Client, dataset: Dataset, docs: list[dict]) -> tuple[dict, float]:
    """Submit the three-annotator job and follow it, with each annotator's count in the progress lines."""
    body = {"taxonomy": dataset.taxonomy, "documents": [{"id": d["doc_id"], "text": d["text"]} for d in docs],
            "annotators": ANNOTATORS, "aggregation": "dawid_skene"}
    return _service.follow_job(client, body, dataset.key, lambda job: " (" + ", ".join(
        f"{a['name']} {a['done']}" for a in job["annotators"]) + ")", every_s=PROGRESS_EVERY_S)


def annotator_truth(client: httpx.Client, job_id: str, truth: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Per annotator name: (correct, answered) over all documents; abstained and failed rows are not answered."""
    rows = _service.sql(client, f"SELECT ja.name, a.doc_id, a.label, a.status = 'ok' AND NOT coalesce(a.abstained, false) AS ok"
                       f" FROM annotations a JOIN job_annotators ja USING (job_id, annotator)"
                       f" WHERE a.job_id = '{job_id}'")
    result = {a["name"]: (0, 0) for a in ANNOTATORS}
    for row in rows:
        correct, answered = result[row["name"]]
        if row["ok"] and row["label"] is not None:
            result[row["name"]] = (correct + (row["label"] == truth[row["doc_id"]]), answered + 1)
    return result


def job_labels(client: httpx.Client, job_id: str) -> dict[str, dict]:
    """The job's aggregated labels by doc_id: label, confidence, abstained, distribution, conformal_candidates."""
    rows = _service.sql(client, f"SELECT doc_id, label, confidence, abstained, distribution, conformal_candidates FROM labels"
                       f" WHERE job_id = '{job_id}'")
    return {row["doc_id"]: row for row in rows}


def correct_answered(labels: dict[str, dict], truth: dict[str, str]) -> tuple[int, int]:
    """(correct, answered) of aggregated labels over every document of ``truth``; missing ones count as unanswered."""
    answered = [labels[d]["label"] == t for d, t in truth.items()
                if d in labels and labels[d]["label"] is not None and not labels[d]["abstained"]]
    return sum(answered), len(answered)


def add_gold(client: httpx.Client, job_id: str, truth: dict[str, str], args) -> set[str]:
    """Draw the gold sample and post the dataset's labels for it as annotator 'dataset'; returns its doc_ids."""
    _service.call(client, "POST", f"/v1/jobs/{job_id}/gold-sample", json={"size": args.gold, "design": args.design,
                                                                 "seed": args.seed})
    sampled = [row["doc_id"] for row in _service.call(client, "GET", f"/v1/jobs/{job_id}/gold-sample")]
    _service.call(client, "POST", f"/v1/jobs/{job_id}/gold",
         json={"annotator": "dataset", "labels": [{"doc_id": d, "label": truth[d]} for d in sampled]})
    return set(sampled)


def selective_truth(labels: dict[str, dict], truth: dict[str, str], *, coverage: float | None = None,
                    threshold: float | None = None) -> tuple[int, int]:
    """(correct, kept) among documents with confidence ≥ a threshold: the given one, or the one that keeps the
    most confident ``coverage`` share (ties kept together, as the report does). Unlabelled documents are never kept."""
    rows = [(round(labels[d]["confidence"] or 0.0, TIE_DECIMALS), labels[d]["label"] == t and not labels[d]["abstained"])
            for d, t in truth.items() if d in labels]
    confidence = np.array([c for c, _ in rows])
    if threshold is None:
        ordered = np.sort(confidence)[::-1]
        threshold = ordered[min(len(ordered), max(1, int(np.ceil(coverage * len(truth))))) - 1]
    kept = [ok for c, ok in rows if c >= threshold]
    return sum(kept), len(kept)


def pct(value: float | None) -> str | None:
    """A share as a percentage with one decimal; None (—) when missing."""
    return None if value is None else f"{value:.1%}"


def interval(estimate: dict | None, true_share: float | None = None) -> str | None:
    """'est [low, high]' from an estimate dict, with ✓/✗ for whether it holds ``true_share``."""
    if estimate is None:
        return None
    text = f"{estimate['estimate']:.1%}"
    if estimate.get("low") is not None:
        text += f" [{estimate['low']:.1%}, {estimate['high']:.1%}]"
        if true_share is not None:
            text += " ✓" if estimate["low"] <= true_share <= estimate["high"] else " ✗"
    return text


def wilson_of(pair: tuple[int, int]) -> str | None:
    """fmt_acc of (correct, n); — for n = 0."""
    return fmt_acc(*pair) if pair[1] else None


@dataclass
class Measured:
    """Everything one dataset's run gathered from the service, with the truth it is compared to."""

    docs: list[dict]
    truth: dict[str, str]
    job_id: str
    seconds: float
    members: dict[str, tuple[int, int]]  # annotator name -> (correct, answered) on all documents
    gold_ids: set[str]
    methods: dict[str, tuple[tuple[int, int], dict]]  # method -> ((correct, answered), its report)
    labels: dict[str, dict]  # the aggregated labels of the last method (dawid_skene)
    conformal: list[tuple[dict, dict[str, dict]]]  # per α: (calibration, labels with its candidate sets)
    shares: dict
    curve: list[tuple[int, str, tuple[int, int]]]  # (gold labels, what trained, (correct, answered) off the sample)

    @property
    def counts(self) -> dict[str, int]:
        """Documents per dataset label."""
        return {label: sum(t == label for t in self.truth.values()) for label in sorted(set(self.truth.values()))}


def measure(running: _service.Service, dataset: Dataset, args) -> Measured:
    """Label one dataset's subsample with the panel, then gather accuracy, gold, calibration and estimates."""
    docs = subsample(args.data_dir / dataset.csv_name, args.docs, args.seed)
    truth = {d["doc_id"]: d["label"] for d in docs}
    with running.client() as client:
        _service.call(client, "POST", "/v1/taxonomies", content=(ROOT / "taxonomy" / dataset.taxonomy_file).read_bytes())
        job, seconds = run_job(client, dataset, docs)
        job_id = job["job_id"]
        _service.progress(f"{dataset.key}: job {job_id} done in {seconds:.0f} s")
        members = annotator_truth(client, job_id, truth)
        curve = [relabelled(client, job_id, truth, set())]  # no gold yet: the label-free refinement
        _service.call(client, "POST", f"/v1/jobs/{job_id}/aggregate", json={"method": "dawid_skene"})  # as submitted
        gold_ids = add_gold(client, job_id, truth, args)
        methods = {}
        for method in METHODS:
            _service.call(client, "POST", f"/v1/jobs/{job_id}/aggregate", json={"method": method})
            methods[method] = (correct_answered(job_labels(client, job_id), truth),
                               _service.call(client, "GET", f"/v1/jobs/{job_id}/report"))
        labels = job_labels(client, job_id)
        conformal = []
        for alpha in ALPHAS:
            calibration = _service.call(client, "POST", f"/v1/jobs/{job_id}/calibrate",
                               json={"alpha": alpha, "target_accuracy": 0.9, "seed": args.seed})
            conformal.append((calibration, job_labels(client, job_id)))
        shares = _service.call(client, "POST", f"/v1/jobs/{job_id}/estimate", json={"target": "proportions", "seed": args.seed})
        curve += learning_curve(client, job_id, truth, args)  # last: it redraws the gold sample
    return Measured(docs, truth, job_id, seconds, members, gold_ids, methods, labels, conformal, shares, curve)


def learning_curve(client: httpx.Client, job_id: str, truth: dict[str, str], args) -> list[tuple[int, str, tuple]]:
    """The job relabelled ('refined') with N gold labels, for each N of LEARNING_CURVE up to --gold.

    Each N redraws a random gold sample of N (the dataset's labels posted for it), so every
    point is what a team with N labelled documents would get.
    """
    points = []
    for size in (n for n in LEARNING_CURVE if n <= args.gold):
        _service.call(client, "POST", f"/v1/jobs/{job_id}/gold-sample",
                      json={"size": size, "seed": args.seed + size, "replace": True})
        sample = {row["doc_id"] for row in _service.call(client, "GET", f"/v1/jobs/{job_id}/gold-sample")}
        _service.call(client, "POST", f"/v1/jobs/{job_id}/gold",
                      json={"annotator": "dataset", "labels": [{"doc_id": d, "label": truth[d]} for d in sample]})
        points.append(relabelled(client, job_id, truth, sample))
    return points


def relabelled(client: httpx.Client, job_id: str, truth: dict[str, str], sample: set[str]) -> tuple[int, str, tuple]:
    """(gold labels, what the refinement trained on, (correct, answered) outside ``sample``) after POST aggregate."""
    answer = _service.call(client, "POST", f"/v1/jobs/{job_id}/aggregate", json={"method": "refined"})
    rest = {d: t for d, t in truth.items() if d not in sample}
    return len(sample), answer["refinement"]["trained_on"], correct_answered(job_labels(client, job_id), rest)


def print_dataset(dataset: Dataset, m: Measured, args) -> None:
    """One dataset's facts and its four tables."""
    n, counts = len(m.docs), m.counts
    print_facts(f"{dataset.key}: {n} documents, {len(ANNOTATORS)} annotators, gold sample of {len(m.gold_ids)}", [
        f"data: {(args.data_dir / dataset.csv_name).resolve()}; uniform subsample of {n} rows, seed {args.seed}",
        "dataset labels in the subsample: " + ", ".join(f"{k} {v} ({v / n:.1%})" for k, v in counts.items()),
        f"blank texts in the subsample: {sum(not d['text'].strip() for d in m.docs)} (every annotator abstains on "
        "them with empty_text, so they count as wrong)",
        f"taxonomy: {dataset.taxonomy}; job {m.job_id}, aggregation dawid_skene (the report, calibration and "
        "estimates below use it)",
        f"labelling: {m.seconds:.0f} s for {n} documents × {len(ANNOTATORS)} annotators = "
        f"{n * len(ANNOTATORS) / m.seconds:.2f} annotator-documents/s ({n / m.seconds:.2f} documents/s)",
        f"gold sample: design {args.design}, seed {args.seed}, {len(m.gold_ids)} documents labelled by 'dataset' "
        "(its own labels)", load_now()])
    print_accuracy(m)
    print_conformal(m)
    print_selective(m)
    print_shares(m)
    print_curve(m)


def print_curve(m: Measured) -> None:
    """The learning curve: the job's panel relabelled with N gold labels, on the documents outside the sample."""
    rows = [[size, trained, fmt_acc(correct, len(m.truth) - size), pct(answered / (len(m.truth) - size))]
            for size, trained, (correct, answered) in m.curve]
    print_table(["gold labels", "refinement trained on", "accuracy off the sample [95% CI]", "coverage"], rows,
                "Learning curve: POST .../aggregate {\"method\": \"refined\"} after a random gold sample of N "
                "(a new one per N) got its labels; accuracy over the documents outside it.")


def print_accuracy(m: Measured) -> None:
    """Each annotator and aggregation against all dataset labels, next to the report's gold estimate."""
    n, report = len(m.docs), m.methods[METHODS[-1]][1]
    gold_members = {row["name"]: row for row in report.get("annotators", [])}
    rows = [[name, fmt_acc(correct, n), pct(answered / n), pct(gold_members.get(name, {}).get("accuracy")),
             pct(gold_members.get(name, {}).get("coverage"))] for name, (correct, answered) in m.members.items()]
    for method, ((correct, answered), method_report) in m.methods.items():
        rows.append([f"aggregated: {method}", fmt_acc(correct, n), pct(answered / n),
                     interval(method_report.get("accuracy")), pct(method_report.get("coverage"))])
    majority, count = max(m.counts.items(), key=lambda kv: kv[1])
    rows.append([f"majority class ({majority}, in-sample)", fmt_acc(count, n), pct(1.0), None, None])
    print_table(["annotator or method", f"accuracy, all {n} docs [95% CI]", "coverage, all docs",
                 f"gold estimate ({len(m.gold_ids)} docs)", "gold coverage"], rows,
                "Accuracy on all docs counts abstained and failed documents as wrong. The gold estimate is the "
                "quality report's (design-weighted, over answered documents; an aggregation's with its 95% interval).")


def print_conformal(m: Measured) -> None:
    """Per α: the calibration's promise and held-out gold coverage, and the coverage realised outside the gold."""
    outside = {d: t for d, t in m.truth.items() if d not in m.gold_ids}
    rows = []
    for calibration, after in m.conformal:
        sets = [(after[d]["conformal_candidates"] or []) if d in after else [] for d in outside]
        covered = sum(t in s for s, t in zip(sets, outside.values()))
        rows.append([calibration["alpha"], pct(1 - calibration["alpha"]), f"{calibration['threshold']:.3g}",
                     pct(calibration["coverage"]), pct(calibration["mean_coverage"]),
                     f"{calibration['mean_set_size']:.2f}", wilson_of((covered, len(outside))),
                     f"{np.mean([len(s) for s in sets]):.2f}" if sets else None])
    print_table(["α", "target coverage", "threshold", "gold held-out coverage (one split)",
                 "gold held-out coverage (mean of splits)", "gold mean set size",
                 f"realised coverage, {len(outside)} non-gold docs [95% CI]", "non-gold mean set size"], rows,
                "Candidate sets hold every label whose aggregated probability reaches the threshold calibrated on the "
                "gold sample (labels.conformal_candidates); held-out columns calibrate on half the gold and test on "
                "the other half, the realised ones test on every document outside the gold sample.")


def print_selective(m: Measured) -> None:
    """Selective accuracy at each coverage: the report's gold row, and the truth on all documents."""
    n, report = len(m.docs), m.methods[METHODS[-1]][1]
    rows = []
    for target in COVERAGES:
        row = next((s for s in sorted(report["selective"], key=lambda s: s["coverage"])
                    if s["coverage"] >= target - 1e-9), report["selective"][-1])
        at_threshold = selective_truth(m.labels, m.truth, threshold=row["threshold"])
        top = selective_truth(m.labels, m.truth, coverage=target)
        rows.append([pct(target), pct(row["coverage"]), f"{row['threshold']:.3f}", pct(row["accuracy"]),
                     pct(at_threshold[1] / n), wilson_of(at_threshold), pct(top[1] / n), wilson_of(top)])
    print_table(["target coverage", "gold: coverage", "gold: threshold", "gold: accuracy",
                 "all docs at that threshold: coverage", "accuracy [95% CI]", "all docs, most confident: coverage",
                 "accuracy [95% CI]"], rows,
                "Gold columns are the report's selective row nearest at or above the target; the truth columns keep "
                "every document with aggregated confidence at or above the gold row's threshold, or the most "
                "confident share of all documents (ties kept together).")


def print_shares(m: Measured) -> None:
    """Each label's true share in the subsample against the DSL, naive and gold-only estimates."""
    n, counts = len(m.docs), m.counts
    rows = [[row["label"], pct(counts.get(row["label"], 0) / n),
             *(interval(row[kind], counts.get(row["label"], 0) / n) for kind in ("dsl", "naive", "gold_only"))]
            for row in m.shares["estimates"]]
    print_table(["label", f"true share ({n} docs)", "DSL [95% CI]", "naive [95% CI]", "gold-only [95% CI]"], rows,
                "✓: the interval holds the true share of the subsample. DSL corrects the LLM's labels with the gold "
                "sample (cross-fitted, design-weighted); naive counts the aggregated top labels; gold-only uses the "
                f"{len(m.gold_ids)} gold labels alone.")


def main() -> None:
    """Parse flags, start one service, and benchmark each dataset on it in turn."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--docs", type=int, default=1500, help="documents sampled from each dataset")
    parser.add_argument("--gold", type=int, default=200, help="gold sample size (documents given the dataset label)")
    parser.add_argument("--design", default="random", choices=["random", "stratified", "uncertainty"],
                        help="gold sample design")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsample, gold sample and calibration")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated datasets, in order")
    parser.add_argument("--data-dir", type=Path, default=DATA, help="where rotten_tomatoes.csv and sms_spam.csv are")
    parser.add_argument("--workdir", type=Path,
                        help="a new dir for the service's data and log (None: a temporary dir, removed at the end)")
    args = parser.parse_args()
    chosen = [part.strip() for part in args.datasets.split(",") if part.strip()]
    unknown = [key for key in chosen if key not in DATASETS]
    if unknown:
        parser.error(f"unknown datasets {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    if args.gold < 10 or args.gold > args.docs:
        parser.error(f"--gold {args.gold}: needs at least 10 (conformal calibration) and at most --docs {args.docs}")
    missing = [str((args.data_dir / DATASETS[key].csv_name).resolve()) for key in chosen
               if not (args.data_dir / DATASETS[key].csv_name).exists()]
    if missing:
        sys.exit(f"not found: {', '.join(missing)}; this benchmark needs ../shared/data (or pass --data-dir)")
    wall = time.perf_counter()
    print_facts("Machine", machine_facts())
    print(f"Command: `{shlex.join([sys.executable, *sys.argv])}`\n\n{HOW_TO_READ}\n", flush=True)
    with ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-quality-")))
        started = time.perf_counter()
        running = stack.enter_context(_service.service(workdir, MODELS_YAML, {"ANNOTATE_SQL_MAX_ROWS": "1000000"}))
        _service.progress(f"service up in {time.perf_counter() - started:.0f} s")
        for key in chosen:
            print_dataset(DATASETS[key], measure(running, DATASETS[key], args), args)
    print(load_now())
    print(f"Whole benchmark wall time: {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
