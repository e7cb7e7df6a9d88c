"""Quality of a job's labels against its gold sample, and statistics that stay valid when the LLM is wrong.

Each function reads the job's labelled documents and gold sample from the store (one
row per document: the output distribution, label, inclusion probability and gold
label), calls the pure functions of ``service.quality`` (``metrics``, ``conformal``, ``dsl``), and keeps what a person
would query in DuckDB:

- ``report``: design-weighted accuracy, per-label precision/recall/F1, confusion, ECE
  and reliability, selective accuracy, abstentions, LLM–human and annotator agreement,
  DSL label shares (tables ``quality_metrics``, ``confusion_matrix``, ``reliability``,
  ``selective_accuracy``, and the whole answer in ``quality_results``);
- ``calibrate``: split-conformal candidate sets at a chosen α and an abstention
  threshold for a target accuracy (table ``calibrations``; the ``labels`` view's
  ``conformal_candidates`` column applies the threshold);
- ``estimate``: label shares or regression coefficients by DSL, next to the naive and
  gold-only estimates;
- ``label_issues``: likely label errors, ranked, among gold labels or the LLM's labels
  (table ``label_issues``).

Documents of the sample without a human label yet are left out, which assumes they are
missing at random; every answer says how many there are.

Reads never compute: ``report`` and ``label_issues`` run on a write (their POST routes, and
``refresh_report`` after a calibration or a relabelling) and store their
answer; ``stored_report`` and ``stored_label_issues`` read it back with when it was computed.
"""

from __future__ import annotations

import json

import numpy as np

from service.engines.embeddings import shared_embedder
from service.errors import Conflict, InvalidInput
from service.labelling.aggregation import agreement
from service.labelling.labeller import FLAT_SHORTLIST, options_of
from service.labelling.shortlist import wilson
from service.quality.conformal import abstention_threshold, conformal_sets
from service.quality.dsl import dsl_proportions, dsl_regression
from service.quality.label_issues import rank_gold_issues, rank_llm_issues
from service.quality.metrics import quality_report
from service.store import Store

TEXT_CHARS = "text_chars"  # a covariate every document has: its length in characters
REPORT = "report"  # the kind of stored result a report is (``quality_results.kind``)
LABEL_ISSUES = "label_issues_"  # + gold or llm: the kind of a stored label-issue ranking


class GoldData:
    """A job's labelled documents as arrays, with the gold sample marked."""

    def __init__(self, store: Store, job_id: str):
        job = store.jobs.get(job_id)
        taxonomy = store.taxonomies.get(job.taxonomy, job.taxonomy_version).taxonomy
        if taxonomy.multi_label:
            raise InvalidInput(f"job {job_id} uses the multi-label taxonomy {taxonomy.name!r}; gold statistics, "
                               "calibration and estimates cover single-label taxonomies")
        self.job = job
        self.options = list(options_of(taxonomy))
        self.columns = store.quality.population(job_id, self.options)
        self.probs = self.columns["probs"]
        sampled = ~np.isnan(self.columns["inclusion_prob"])
        labelled = np.array([g is not None for g in self.columns["gold_label"]], dtype=bool)
        self.gold = sampled & labelled  # the sample documents people have labelled
        if not self.gold.any():
            raise Conflict(f"job {job_id} has no gold labels yet: draw a sample (POST .../gold-sample) and label it "
                           "(POST .../gold or `annotate gold import`)")
        self.pi = np.where(sampled, self.columns["inclusion_prob"], 1.0)
        self.sample: dict[str, int | str] = {"sampled": int(sampled.sum()), "labelled": int(self.gold.sum()),
                       "unlabelled": int((sampled & ~labelled).sum())}
        if self.sample["unlabelled"]:
            self.sample["warning"] = (f"{self.sample['unlabelled']} sampled documents have no gold label yet; "
                                      "they are left out, which assumes they are missing at random")

    def gold_index(self) -> np.ndarray:
        """Column of each document's gold label; −1 when it has none or it is outside the options."""
        position = {name: k for k, name in enumerate(self.options)}
        return np.array([position.get(g, -1) if self.gold[i] else -1
                         for i, g in enumerate(self.columns["gold_label"])])

    def at_gold(self, name: str) -> list:
        """A column restricted to the gold documents."""
        return [value for value, keep in zip(self.columns[name], self.gold) if keep]


def report(store: Store, job_id: str) -> dict:
    """Compute the quality report of a job against its gold sample and store it (report tables and the answer)."""
    data = GoldData(store, job_id)
    weights = 1 / data.pi[data.gold]
    result = quality_report(gold=data.at_gold("gold_label"), predicted=data.at_gold("label"),
                            probs=data.probs[data.gold], labels=data.options, weights=weights,
                            abstain_reasons=data.at_gold("abstain_reason"))
    result = {"job_id": job_id, "sample": data.sample, **result, **_annotators(store, data),
              "humans": _human_agreement(store, job_id)}
    result["refinement"] = data.job.annotator_spec.get("refinement")  # labels fitted to gold say how (cross-fitted)
    result["calibration"] = store.quality.calibration(job_id)
    result["shortlist"] = _shortlist_recall(data)
    result["shares"] = _shares(data)
    store.quality.put_tables(job_id, *_tables(result))
    computed_at = store.quality.put_result(job_id, REPORT, result)
    return {**result, "computed_at": computed_at}


def refresh_report(store: Store, job_id: str) -> None:
    """Recompute a job's stored report after what it depends on changed; none is kept while there is nothing to report.

    The report is renewed on a calibration and a relabelling (each an explicit write
    whose effect the report shows), not on every gold label: labelling goes on at the pace of a
    keystroke, and the report says when it was computed and from how many gold labels.
    """
    try:
        report(store, job_id)
    except (Conflict, InvalidInput):  # no gold labels, or a multi-label taxonomy: an older report would mislead
        store.quality.forget_result(job_id, REPORT)


def forget_stale(store: Store, job_id: str) -> None:
    """A new gold sample: its labels are yet to come, so the report and the gold ranking of the old one are dropped."""
    store.quality.forget_result(job_id, REPORT)
    forget_label_issues(store, job_id, ("gold",))


def forget_label_issues(store: Store, job_id: str, kinds: tuple[str, ...]) -> None:
    """Drop rankings of label issues whose labels changed since (a new sample, new gold labels, a relabelling)."""
    for kind in kinds:
        store.quality.forget_result(job_id, LABEL_ISSUES + kind)


def stored_report(store: Store, job_id: str) -> dict:
    """A job's last computed report, with when it was computed."""
    store.jobs.state(job_id)  # 404 for an unknown job (without counting its documents)
    stored = store.quality.result(job_id, REPORT)
    if stored is None:
        raise Conflict(f"job {job_id} has no quality report yet: compute it once people have labelled gold "
                       "documents (POST /v1/jobs/{id}/report, `annotate report`)")
    return {**stored.result, "computed_at": stored.computed_at}


def _shares(data: GoldData) -> dict:
    """The labels' shares by DSL (with the naive and gold-only ones), for the report's readers (the console)."""
    try:
        rows = dsl_proportions(probs=data.probs, labels=data.options, gold_index=data.gold_index(), pi=data.pi,
                               sampled=data.gold, seed=0, level=0.95)
    except ValueError as exc:
        return {"level": 0.95, "problem": str(exc), "estimates": []}
    return {"level": 0.95, "problem": None, "estimates": rows}


def _shortlist_recall(data: GoldData) -> dict | None:
    """How often the gold label was among the leaves scored (shortlisted jobs; None otherwise), with its interval.

    Unweighted over the labelled sample: the share of gold documents whose label the model could choose.
    """
    pairs = [(gold, shortlist) for gold, shortlist in zip(data.at_gold("gold_label"), data.at_gold("shortlist"))
             if shortlist is not None]
    if not pairs:
        return None
    hits = sum(gold in shortlist for gold, shortlist in pairs)
    low, high = wilson(hits, len(pairs))
    return {"n": len(pairs), "recall": hits / len(pairs), "interval": {"low": low, "high": high, "level": 0.95},
            "k": max(len(shortlist) for _, shortlist in pairs),
            "flat": sum(reason == FLAT_SHORTLIST for reason in data.columns["abstain_reason"])}


def annotator_agreement(store: Store, job_id: str) -> dict:
    """Agreement between a several-annotator job's annotators (no gold needed)."""
    job = store.jobs.get(job_id)
    if len(job.annotators) < 2:
        raise Conflict(f"job {job_id} has one annotator; agreement needs two or more")
    return {"job_id": job_id, **agreement(store.annotations.member_rows(job_id),
                                          {m.annotator: m.name for m in job.annotators})}


def _annotators(store: Store, data: GoldData) -> dict:
    """Each annotator's weighted accuracy on the gold sample and their agreement (several-annotator jobs)."""
    members = data.job.annotators
    if len(members) < 2:
        return {}
    gold = {doc: (label, 1 / pi) for doc, label, pi, keep in
            zip(data.columns["doc_id"], data.columns["gold_label"], data.pi, data.gold) if keep}
    rows = store.annotations.member_rows(data.job.job_id)
    names = {m.annotator: m.name for m in members}
    accuracy = []
    for member in members:
        votes = [(r["label"], *gold[r["doc_id"]]) for r in rows
                 if r["annotator"] == member.annotator and r["doc_id"] in gold]
        answered = [(label == truth, w) for label, truth, w in votes if label is not None]
        total = sum(w for _, _, w in votes)
        accuracy.append({"name": member.name, "n": len(votes),
                         "accuracy": _weighted_mean(answered),
                         "coverage": sum(w for _, w in answered) / total if total else None})
    return {"annotators": accuracy, "agreement": agreement(rows, names)}


def _human_agreement(store: Store, job_id: str) -> dict | None:
    """How often the people who labelled the gold sample agree with each other (None with fewer than two)."""
    rows = store.quality.gold_label_rows(job_id)
    people = sorted({r["annotator"] for r in rows})
    if len(people) < 2:
        return None
    votes = [{**r, "status": "ok", "abstained": False} for r in rows]
    return {"people": people, **agreement(votes, {p: p for p in people})}


def _weighted_mean(pairs: list[tuple[bool, float]]) -> float | None:
    """Σ w·x / Σ w, None for nothing."""
    total = sum(w for _, w in pairs)
    return sum(w for ok, w in pairs if ok) / total if total else None


def _tables(result: dict) -> tuple[list[tuple], dict[str, list[tuple]]]:
    """The report as rows of quality_metrics and of the report tables."""
    metrics: list[tuple] = [(name, None, result[name]["estimate"] if isinstance(result[name], dict) else result[name])
               for name in ("accuracy", "top_label_accuracy", "coverage", "abstention_rate", "ece", "kappa")
               if result.get(name) is not None]
    metrics += [(f"{key}", row["label"], row[key]) for row in result["per_label"]
                for key in ("precision", "recall", "f1") if row[key] is not None]
    metrics += [("annotator_accuracy", row["name"], row["accuracy"]) for row in result.get("annotators", [])
                if row["accuracy"] is not None]
    tables: dict[str, list[tuple]] = {
        "confusion_matrix": [(c["gold"], c["predicted"], c["n"], c["weighted_n"]) for c in result["confusion"]],
        "reliability": [(r["bin"], r["lower"], r["upper"], r["n"], r["confidence"], r["accuracy"])
                        for r in result["reliability"]],
        "selective_accuracy": [(s["coverage"], s["threshold"], s["accuracy"], s["n"]) for s in result["selective"]],
    }
    return metrics, tables


def calibrate(store: Store, job_id: str, *, alpha: float, target_accuracy: float, seed: int = 0) -> dict:
    """Conformal candidate-set threshold at level 1−α and an abstention threshold for a target accuracy; kept."""
    data = GoldData(store, job_id)
    probs, gold_index, weights = data.probs[data.gold], data.gold_index()[data.gold], 1 / data.pi[data.gold]
    try:
        result = conformal_sets(probs=probs, gold_index=gold_index, alpha=alpha, weights=weights, seed=seed)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    correct = (probs.argmax(axis=1) == gold_index) & (gold_index >= 0)
    result["abstention"] = abstention_threshold(confidence=probs.max(axis=1), correct=correct, weights=weights,
                                                target_accuracy=target_accuracy)
    result.update(job_id=job_id, sample=data.sample)
    store.quality.put_calibration(job_id, result)
    return result


def estimate(store: Store, job_id: str, *, target: str, outcome: str | None = None,
             covariates: list[str] | None = None, model: str = "linear", level: float = 0.95, seed: int = 0) -> dict:
    """Label shares or regression coefficients: DSL next to the naive and gold-only estimates."""
    data = GoldData(store, job_id)
    common = dict(probs=data.probs, labels=data.options, gold_index=data.gold_index(), pi=data.pi,
                  sampled=data.gold, seed=seed, level=level)
    try:
        if target == "proportions":
            rows = dsl_proportions(**common)
        else:
            if outcome is None:
                raise ValueError("target 'regression' needs 'outcome' (a label)")
            matrix, names = _covariates(data.columns, covariates or [])
            rows = dsl_regression(**common, outcome=outcome, covariates=matrix, names=names, model=model)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    return {"job_id": job_id, "target": target, "outcome": outcome, "model": model if target != "proportions" else None,
            "level": level, "documents": len(data.probs), "sample": data.sample,
            "estimates": rows}


MAX_COVARIATE_COLUMNS = 100  # regression columns after one-hot coding: the fit grows with their square


def _covariates(columns: dict, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """A numeric matrix of document metadata: numbers as they are, strings one-hot (first category dropped)."""
    if not names:
        raise InvalidInput("covariates: name at least one metadata field (or 'text_chars') for a regression")
    if len(set(names)) != len(names):
        raise InvalidInput("covariates: each field once; a repeated column makes the regression singular")
    metas = [json.loads(m) if m else {} for m in columns["meta"]]
    blocks, out_names = [], []
    for name in names:
        if name == TEXT_CHARS:
            blocks.append(np.array(columns["text_chars"], dtype=float)[:, None])
            out_names.append(name)
            continue
        values = [meta.get(name) for meta in metas]
        missing = [columns["doc_id"][i] for i, v in enumerate(values) if v is None]
        if missing:
            raise InvalidInput(f"covariates: {len(missing)} document(s) have no meta field {name!r}, e.g. doc_id "
                               f"{missing[0]!r}; every document needs it")
        if all(isinstance(v, (int, float)) for v in values):
            blocks.append(np.array(values, dtype=float)[:, None])
            out_names.append(name)
        else:
            levels = sorted({str(v) for v in values})
            if len(levels) < 2:
                raise InvalidInput(f"covariates: meta field {name!r} has one value only ({levels[0]!r})")
            if len(out_names) + len(levels) - 1 > MAX_COVARIATE_COLUMNS:
                raise InvalidInput(f"covariates: meta field {name!r} has {len(levels):,} distinct values; one-hot "
                                   f"coding would pass {MAX_COVARIATE_COLUMNS} regression columns")
            blocks.append(np.array([[str(v) == level for level in levels[1:]] for v in values], dtype=float))
            out_names += [f"{name}={level}" for level in levels[1:]]
    return np.hstack(blocks), out_names


def label_issues(store: Store, job_id: str, *, kind: str, limit: int = 50, max_documents: int = 20_000,
                 seed: int = 0) -> dict:
    """Likely label errors, most suspicious first: confident learning (cleanlab) plus annotator disagreement."""
    if kind == "gold":
        data = GoldData(store, job_id)
        ranked = rank_gold_issues(data)
    else:
        ranked = rank_llm_issues(store, job_id, max_documents=max_documents, seed=seed,
                                 embed=lambda texts: shared_embedder().embed(texts))
    store.quality.put_label_issues(job_id, kind, ranked["rows"])
    result = {"job_id": job_id, "kind": kind, "checked": ranked["checked"],
              "issues": sum(r["is_issue"] for r in ranked["rows"]), "rows": ranked["rows"]}
    computed_at = store.quality.put_result(job_id, LABEL_ISSUES + kind, result)
    return {**result, "rows": ranked["rows"][:limit], "computed_at": computed_at}


def stored_label_issues(store: Store, job_id: str, *, kind: str, limit: int = 50) -> dict:
    """A job's last label-issue ranking of a kind (its ``limit`` most suspicious rows), with when it was computed."""
    store.jobs.state(job_id)  # 404 for an unknown job (without counting its documents)
    stored = store.quality.result(job_id, LABEL_ISSUES + kind)
    if stored is None:
        raise Conflict(f"job {job_id} has no ranking of {kind} label issues yet: compute one (POST "
                       "/v1/jobs/{id}/label-issues, `annotate audit`)")
    return {**stored.result, "rows": stored.result["rows"][:limit], "computed_at": stored.computed_at}
