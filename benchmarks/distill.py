"""Distillation: the LLM's labels taught to every student kind, and what each keeps and costs, in one run.

On ``../shared/data/trec_questions.csv`` (coarse labels ABBR, DESC, ENTY, HUM, LOC, NUM;
taxonomy ``trec-coarse``) the real service (`annotate serve`, a fresh data dir, the
embedded SmolLM2-135M scoring labels):

- labels a seeded training split (``--train`` distinct questions) and a disjoint test
  split (``--test``) with a normal job each; the test job's wall time is the LLM's
  docs/s in this run;
- trains every student kind (ngram, static, minilm, finetune) on the training job with
  ``POST /v1/classifiers``, one after another, and prints the options each chose;
- labels the test split with each student over HTTP (``POST /v1/classifiers/{id}/predict``
  in batches of 256) and sets each beside the LLM: accuracy against the dataset's coarse
  labels, agreement with the LLM's labels, docs/s, p50 latency, size on disk, and the
  cost ratio (LLM seconds per document over the student's, both measured here);
- runs a cascade job over the test split (``"classifier"``, ``"cascade_threshold"``) at
  each of ``--thresholds``: accuracy and the share of documents sent to the LLM.

    .venv/bin/python benchmarks/distill.py [--train 1500] [--test 500] [--seed 0] [--epochs 2]
        [--thresholds 0.6,0.9] [--cascade-kind minilm] [--workdir DIR]

The cascade's LLM step reads the annotation cache the test-split job filled (same texts,
same annotator), and its second threshold reads the student's too, so a cascade's wall
time undercounts its cost; the table gives it as measured and next to it an estimate from
the per-document costs measured above.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import _service
import httpx
import numpy as np
from _report import fmt, fmt_acc, load_now, machine_facts, percentile, print_facts, print_table

ROOT = _service.ROOT
TREC = ROOT / ".." / "shared" / "data" / "trec_questions.csv"
TAXONOMY_FILE = ROOT / "taxonomy" / "trec-coarse.yaml"
TAXONOMY = "trec-coarse"
MODELS_YAML = "default: smollm2\nmodels:\n  smollm2: {engine: embedded}\n"
KINDS = ("ngram", "static", "minilm", "finetune")
PREDICT_BATCH = 256
PROGRESS_EVERY_S = 10.0
MIB = 2**20
HOW_TO_READ = (
    "How to read this: every number is measured on the test split, which shares no question text with the training "
    "split (duplicate questions are dropped before splitting, so no test document is served from the cache of the "
    "training job). Accuracy is against the dataset's coarse labels, with its 95% Wilson interval; abstained or "
    "failed documents count as wrong. Agreement is the share of test documents where the labeller's label is the "
    "LLM's (what distillation optimises: a student that copied the LLM exactly would have the LLM's accuracy, errors "
    "and all). docs/s is end to end over HTTP: the LLM's is the test-split job from submission "
    "to its end (stream mode, batches of 32); a student's is its predict calls in batches of 256 after one warm-up "
    "call that loads it. The cost ratio is LLM seconds per document over the student's, both from this run on this "
    "machine: how many documents the student labels in the time the LLM labels one. Students differ in how much of "
    "their training split they learn from (the service keeps 20% aside to measure agreement and 10% of the rest to "
    "choose options). A cascade labels every document with the student and sends the ones it is less confident of "
    "than the threshold to the LLM; its LLM-call rate is routed / total.")


@dataclass
class Student:
    """One trained student (or its failure) and its predictions on the test split."""

    kind: str
    row: dict  # GET /v1/classifiers/{id}: status, options, report, size_bytes, error
    train_s: float
    labels: dict[str, str | None] | None = None  # doc_id -> label (None: abstained)
    predict_s: float | None = None

    @property
    def ready(self) -> bool:
        return self.row["status"] == "ready"


@dataclass
class Cascade:
    """One cascade job over the test split at one threshold."""

    threshold: float
    job: dict
    seconds: float
    labels: dict[str, str | None]
    cached: tuple[int, int]  # annotations served from the cache: (student step, LLM step)








def split(path: Path, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict], int, int]:
    """Seeded disjoint (train, test) splits of the distinct, non-blank questions, each in file order.

    Documents are {doc_id, text, gold}; doc_id is the CSV row number. Also returns the
    number of rows and of distinct questions.
    """
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row["text"].strip():
            first.setdefault(row["text"], i)
    distinct = sorted(first.values())
    if n_train + n_test > len(distinct):
        sys.exit(f"--train {n_train} + --test {n_test} is more than the {len(distinct)} distinct questions of {path}")
    order = np.random.default_rng(seed).permutation(len(distinct))

    def docs(picked: np.ndarray) -> list[dict]:
        return [{"doc_id": f"row{distinct[j]:05d}", "text": rows[distinct[j]]["text"],
                 "gold": rows[distinct[j]]["coarse"]} for j in sorted(picked)]

    return docs(order[:n_train]), docs(order[n_train:n_train + n_test]), len(rows), len(distinct)


def run_job(client: httpx.Client, body: dict, what: str) -> tuple[dict, float]:
    """Submit a job and follow it; a cascade's progress lines say how many documents went to the LLM."""
    return _service.follow_job(client, body, what, lambda job: "" if job.get("routed") is None
                               else f", {job['routed']} routed to the LLM", every_s=PROGRESS_EVERY_S)


def job_body(docs: list[dict], **extra) -> dict:
    """An inline job over ``docs`` on the trec-coarse taxonomy."""
    return {"taxonomy": TAXONOMY, "documents": [{"id": d["doc_id"], "text": d["text"]} for d in docs], **extra}


def job_labels(client: httpx.Client, job_id: str) -> dict[str, str | None]:
    """A job's labels by doc_id (None where it abstained); failed documents are absent."""
    rows = _service.sql(client, f"SELECT doc_id, label, abstained FROM labels WHERE job_id = '{job_id}'")
    return {row["doc_id"]: None if row["abstained"] else row["label"] for row in rows}


def fresh_latencies(client: httpx.Client, job_id: str) -> list[float]:
    """Per-document latency_ms of a one-annotator job's freshly scored documents (its batch time / batch size)."""
    rows = _service.sql(client, f"SELECT a.latency_ms FROM annotations a JOIN jobs j ON j.job_id = a.job_id"
                       f" AND j.annotator = a.annotator WHERE a.job_id = '{job_id}' AND a.status = 'ok'"
                       f" AND NOT a.cached")
    return [row["latency_ms"] for row in rows]


def train(client: httpx.Client, job_id: str, kind: str, args) -> Student:
    """Train one student on the training job and wait until it is ready or failed."""
    body = {"jobs": [job_id], "kind": kind, "seed": args.seed}
    if kind == "finetune":
        body["epochs"] = args.epochs
    started = time.perf_counter()
    classifier_id = _service.call(client, "POST", "/v1/classifiers", json=body)["classifier_id"]
    last = started
    while True:
        row = _service.call(client, "GET", f"/v1/classifiers/{classifier_id}")
        now = time.perf_counter()
        if row["status"] != "training":
            break
        if now - last >= PROGRESS_EVERY_S:
            _service.progress(f"student {kind}: training for {now - started:.0f} s")
            last = now
        time.sleep(1.0)
    _service.progress(f"student {kind}: {row['status']} after {now - started:.0f} s"
             + (f": {row['error']}" if row.get("error") else ""))
    return Student(kind, row, now - started)


def predict(client: httpx.Client, student: Student, docs: list[dict]) -> None:
    """Label the test split with a ready student over HTTP; the timing leaves out one warm-up call that loads it."""
    url = f"/v1/classifiers/{student.row['classifier_id']}/predict"
    _service.call(client, "POST", url, json={"texts": [docs[0]["text"]]})
    labels: list[dict] = []
    started = time.perf_counter()
    for start in range(0, len(docs), PREDICT_BATCH):
        labels += _service.call(client, "POST", url, json={"texts": [d["text"] for d in docs[start:start + PREDICT_BATCH]]})[
            "labels"]
    student.predict_s = time.perf_counter() - started
    student.labels = {d["doc_id"]: None if row["abstained"] else row["label"] for d, row in zip(docs, labels)}


def cascade(client: httpx.Client, student: Student, docs: list[dict], threshold: float) -> Cascade:
    """A cascade job over the test split; also how many of each step's annotations came from the cache."""
    body = job_body(docs, classifier=student.row["classifier_id"], cascade_threshold=threshold)
    job, seconds = run_job(client, body, f"cascade {student.kind} at {threshold}")
    counts = {row["annotator"]: row["cached"] for row in _service.sql(
        client, f"SELECT annotator, count(*) FILTER (WHERE cached) AS cached FROM annotations"
                f" WHERE job_id = '{job['job_id']}' GROUP BY annotator")}
    student_key, llm_key = (member["annotator"] for member in job["annotators"])
    return Cascade(threshold, job, seconds, job_labels(client, job["job_id"]),
                   (counts.get(student_key, 0), counts.get(llm_key, 0)))


def correct(labels: dict[str, str | None], docs: list[dict]) -> int:
    """Documents whose label is the dataset's; missing and abstained ones count as wrong."""
    return sum(labels.get(d["doc_id"]) == d["gold"] for d in docs)


def agreement(labels: dict[str, str | None], llm: dict[str, str | None], docs: list[dict]) -> str | None:
    """'share (k/n)' of documents the LLM labelled where ``labels`` gives the LLM's label."""
    judged = [d["doc_id"] for d in docs if llm.get(d["doc_id"]) is not None]
    agree = sum(labels.get(d) == llm[d] for d in judged)
    return f"{agree / len(judged):.1%} ({agree}/{len(judged)})" if judged else None


def dir_size(path: Path) -> int | None:
    """Bytes of the files under ``path`` (a file's own size); None if it does not exist."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else None


def model_sizes() -> dict[str, int | None]:
    """Sizes on disk of the LLM as the embedded engine runs it and of the students' shared feature models."""
    from service.distill.students import STATIC_NAME
    from service.engines.embedded import CONVERTED_NAME
    from service.engines.embeddings import model_dir
    from service.settings import Settings

    models_dir = Settings().models_dir
    return {"llm": dir_size(models_dir / CONVERTED_NAME), "minilm": dir_size(model_dir()),
            "static": dir_size(models_dir / STATIC_NAME)}


def size_text(size: int | None) -> str | None:
    """Bytes as 'x.y MiB', or 'n KiB' under 1 MiB."""
    if size is None:
        return None
    return f"{size / 1024:.0f} KiB" if size < MIB else f"{size / MIB:.1f} MiB"


def print_options(students: list[Student]) -> None:
    """Which training option each student chose, what every option scored, and the student's own report."""
    rows = []
    for s in students:
        if not s.ready:
            rows.append([s.kind, f"failed: {s.row.get('error')}", *[None] * 6, fmt(s.train_s, 0)])
            continue
        report = s.row["report"]
        options, cost = report["options"], report["cost"]
        chosen = f"{options['targets']}/{options['weighting']}"
        tried = [(f"{t['targets']}/{t['weighting']}", t["validation_agreement"]) for t in options["tried"]]
        tried_text = ", ".join(f"**{name} {score:.3f}**" if name == chosen else f"{name} {score:.3f}"
                               for name, score in tried)
        holdout = report["llm_holdout"]
        rows.append([s.kind, chosen + (f", {report['epochs']} epoch(s)" if report["epochs"] else ""),
                     tried_text or "trained once (no search: soft/none unless set)",
                     f"{report['n_train']} / {report['n_validation']} / {report['n_test']}",
                     None if holdout["accuracy"] is None else f"{holdout['accuracy']:.1%}",
                     fmt(cost["docs_per_s"], 0), fmt(cost["p50_latency_ms"], 1), fmt(cost.get("peak_rss_mb"), 0),
                     fmt(s.train_s, 0)])
    print_table(["student", "chosen targets/weighting", "validation agreement of each option tried",
                 "train / validation / holdout docs", "agreement on holdout", "docs/s in process", "p50 ms, 1 doc",
                 "peak RSS MB of the training worker", "training s (HTTP, to ready)"], rows,
                "From each student's own report (GET /v1/classifiers/{id}): options are chosen by agreement with the "
                "LLM on the validation split (the winner in bold); the holdout is the LLM-labelled training documents "
                "the service kept aside; docs/s, p50 latency and peak RSS are measured inside the training task. The "
                "peak RSS is the VmHWM of the Ray worker that trained the student (a fresh worker per training: "
                "training and evaluation included).")


def print_comparison(llm: dict, students: list[Student], docs: list[dict], majority: str, sizes: dict) -> None:
    """The LLM, each student and the majority class on the test split: accuracy, agreement and cost."""
    n, llm_per_doc = len(docs), llm["seconds"] / len(docs)
    p50 = fmt(llm["p50_ms"], 0)
    rows = [["LLM: SmolLM2-135M (embedded, scoring)", fmt_acc(correct(llm["labels"], docs), n), "—",
             fmt(n / llm["seconds"], 2), p50 and f"{p50}†", size_text(sizes["llm"]), "1.0", None]]
    for s in students:
        if not s.ready or s.labels is None:
            rows.append([f"student: {s.kind} (failed)", None, None, None, None, None, None, fmt(s.train_s, 0)])
            continue
        report = s.row["report"]
        rows.append([f"student: {s.kind}", fmt_acc(correct(s.labels, docs), n),
                     agreement(s.labels, llm["labels"], docs),
                     fmt(n / s.predict_s, 0), fmt(report["cost"]["p50_latency_ms"], 1), size_text(s.row["size_bytes"]),
                     fmt(llm_per_doc / (s.predict_s / n), 0), fmt(s.train_s, 0)])
    constant = {d["doc_id"]: majority for d in docs}
    rows.append([f"majority class of the training split ({majority})", fmt_acc(correct(constant, docs), n),
                 agreement(constant, llm["labels"], docs), None, None, None, None, None])
    print_table(["labeller", f"accuracy vs gold, {n} test docs [95% CI]", "agreement with LLM", "docs/s over HTTP",
                 "p50 latency ms", "size on disk", "cost ratio LLM/student", "training s"], rows,
                "† the LLM's p50 is its per-document share of a batch's time (batches of 32 in the job), not a "
                "one-document call; a student's is the median of one-document calls inside its training task (its "
                "report's cost.p50_latency_ms). The LLM's size is the bf16 copy the embedded engine runs. A "
                "student's size is its own directory: the static student reads the model2vec model "
                f"({size_text(sizes['static'])}) and the minilm one all-MiniLM-L6-v2 ({size_text(sizes['minilm'])}, "
                "also the service's embedding annotator) from outside it; the finetune student holds its whole "
                "encoder.")


def print_cascades(cascades: list[Cascade], student: Student, llm: dict, docs: list[dict]) -> None:
    """Each threshold's accuracy, LLM-call rate, measured time and the time estimated without the cache."""
    n = len(docs)
    llm_per_doc, student_per_doc = llm["seconds"] / n, student.predict_s / n
    rows = []
    for c in cascades:
        routed, total = c.job["routed"] or 0, c.job["total"]
        estimate = n * student_per_doc + routed * llm_per_doc
        rows.append([fmt(c.threshold, 2), f"{routed / total:.1%} ({routed}/{total})",
                     fmt_acc(correct(c.labels, docs), n),
                     agreement(c.labels, llm["labels"], docs), fmt(c.seconds, 1), f"{c.cached[0]} / {c.cached[1]}",
                     fmt(estimate, 1), fmt(n / estimate, 1), fmt(n * llm_per_doc / estimate, 1)])
    print_table(["threshold", "LLM-call rate (routed / total)", f"accuracy vs gold, {n} docs [95% CI]",
                 "agreement with LLM", "wall s, measured", "served from cache: student / LLM", "est. s without cache",
                 "est. docs/s", "est. cost ratio LLM/cascade"], rows,
                f"Student: {student.kind} ({student.row['classifier_id']}). The cascade's LLM step reads the cache the "
                "test-split job filled (same texts, same annotator), and a second threshold reads the student's "
                "annotations of the first, so the measured wall time undercounts the cost. The estimate is "
                f"n × the student's s/doc over HTTP ({1000 * student_per_doc:.2f} ms) + routed × the LLM's s/doc "
                f"from the test-split job ({1000 * llm_per_doc:.0f} ms), both measured above; it leaves out the "
                "job's own overhead (two stream passes and the merge), so the true cost is somewhat higher.")


def measure(running: _service.Service, train_docs: list[dict], test_docs: list[dict], args) -> None:
    """Label both splits with the LLM, train and test every student, run the cascades; print as it goes."""
    with running.client() as client:
        _service.call(client, "POST", "/v1/taxonomies", content=TAXONOMY_FILE.read_bytes())
        train_job, train_s = run_job(client, job_body(train_docs), f"LLM on the training split ({len(train_docs)})")
        _service.progress(f"training split labelled in {train_s:.0f} s")
        test_job, test_s = run_job(client, job_body(test_docs), f"LLM on the test split ({len(test_docs)})")
        _service.progress(f"test split labelled in {test_s:.0f} s")
        latencies = fresh_latencies(client, test_job["job_id"])
        llm = {"seconds": test_s, "labels": job_labels(client, test_job["job_id"]), "p50_ms": percentile(latencies, 50)}
        print_facts("LLM labels", [
            f"training split: job {train_job['job_id']}, {len(train_docs)} documents in {train_s:.0f} s "
            f"({len(train_docs) / train_s:.2f} docs/s; the first job also warms the engine), {train_job['failed']} "
            f"failed, {train_job['abstained']} abstained, {train_job['cached']} from the cache",
            f"test split (timed): job {test_job['job_id']}, {len(test_docs)} documents in {test_s:.1f} s "
            f"({len(test_docs) / test_s:.2f} docs/s), {test_job['failed']} failed, {test_job['abstained']} abstained, "
            f"{test_job['cached']} from the cache",
            "LLM accuracy on the training split (what the students learn from): "
            + fmt_acc(correct(job_labels(client, train_job["job_id"]), train_docs), len(train_docs)),
            load_now()])
        students = []
        for kind in KINDS:
            student = train(client, train_job["job_id"], kind, args)
            if student.ready:
                predict(client, student, test_docs)
                _service.progress(f"student {kind}: {len(test_docs)} test documents in {student.predict_s:.2f} s over HTTP")
            students.append(student)
        print("## Students: the options each chose\n")
        print_options(students)
        majority = Counter(d["gold"] for d in train_docs).most_common(1)[0][0]
        print(f"## Accuracy and cost on the test split ({len(test_docs)} documents)\n")
        print_comparison(llm, students, test_docs, majority, model_sizes())
        chosen = next(s for s in students if s.kind == args.cascade_kind)
        print(f"## Cascade: student {args.cascade_kind}, then the LLM on its unsure documents\n")
        if not chosen.ready:
            print(f"No cascade: the {args.cascade_kind} student failed to train ({chosen.row.get('error')}).\n")
            return
        print_cascades([cascade(client, chosen, test_docs, t) for t in args.thresholds], chosen, llm, test_docs)


def thresholds(text: str) -> list[float]:
    """Comma-separated thresholds in (0, 1]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas, e.g. 0.6,0.9") from None
    bad = [v for v in values if not 0 < v <= 1]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: every threshold must be in (0, 1] (the cascade_threshold range)")
    return values


def main() -> None:
    """Parse flags, start one service, measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train", type=int, default=1500, help="questions the LLM labels for the students to learn")
    parser.add_argument("--test", type=int, default=500, help="held-out questions every labeller is measured on")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the students' training")
    parser.add_argument("--epochs", type=int, default=2, help="passes of the finetune student over its documents")
    parser.add_argument("--thresholds", type=thresholds, default="0.6,0.9",
                        help="comma-separated cascade thresholds (documents below go to the LLM)")
    parser.add_argument("--cascade-kind", default="minilm", choices=KINDS, help="the student the cascades use")
    parser.add_argument("--workdir", type=Path,
                        help="a new dir for the service's data and log (None: a temporary dir, removed at the end)")
    args = parser.parse_args()
    if args.train < 50 or args.test < 1:
        parser.error("--train needs at least 50 questions (the students keep 30% aside) and --test at least 1")
    if not 1 <= args.epochs <= 20:
        parser.error(f"--epochs {args.epochs}: the service takes 1 to 20")
    if not TREC.exists():
        sys.exit(f"{TREC.resolve()} not found: this benchmark needs ../shared/data/trec_questions.csv")
    wall = time.perf_counter()
    train_docs, test_docs, n_rows, n_distinct = split(TREC, args.train, args.test, args.seed)
    print_facts("Machine", machine_facts())
    print(f"Command: `{shlex.join([sys.executable, *sys.argv])}`\n\n{HOW_TO_READ}\n", flush=True)
    counts = Counter(d["gold"] for d in test_docs)
    print_facts("Data", [
        f"{TREC.resolve()}: {n_rows} rows, {n_distinct} distinct non-blank questions; seeded split (seed "
        f"{args.seed}) of {len(train_docs)} training and {len(test_docs)} test questions, disjoint",
        "coarse labels in the test split: " + ", ".join(f"{k} {v} ({v / len(test_docs):.1%})"
                                                        for k, v in sorted(counts.items())),
        f"taxonomy {TAXONOMY} ({TAXONOMY_FILE.relative_to(ROOT)}); LLM: embedded SmolLM2-135M-Instruct, scoring; "
        f"students: {', '.join(KINDS)} (finetune: {args.epochs} epoch(s)); cascade student: {args.cascade_kind}, "
        f"thresholds {', '.join(map(str, args.thresholds))}"])
    with ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-distill-")))
        started = time.perf_counter()
        running = stack.enter_context(_service.service(workdir, MODELS_YAML, {"ANNOTATE_SQL_MAX_ROWS": "1000000"}))
        _service.progress(f"service up in {time.perf_counter() - started:.0f} s")
        measure(running, train_docs, test_docs, args)
    print(load_now())
    print(f"Whole benchmark wall time: {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
