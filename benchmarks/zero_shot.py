"""Zero-shot label quality in-process: prompt formats, calibration, the embedding annotator and panels, per dataset.

For each dataset of ``../shared/data`` (SMS, Rotten Tomatoes with ``plot``, TREC coarse,
the convention speeches) a seeded sample of ``--n`` documents is labelled with no human
label by the shipped parts: the embedded SmolLM2 with the default ``classify`` prompt
(chat, options listed) and every other candidate of prompt tuning (``service.labelling.tuning``:
``classify_terse``; the plain completions ``classify_fewshot``, the taxonomy's examples as
demonstrations, and ``classify_plain``), each also with contextual calibration (Zhao et al.
2021: each label's probability divided by its mean over tuning's three content-free
inputs), the candidates tuning would choose with no label (by agreement with the embedding
annotator, its rule, and by mutual information, the rule it was measured against), the
MiniLM embedding annotator, and two panels of ``classify`` + embedding aggregated by
``service.labelling.aggregation`` (``weighted_soft_vote`` with equal weights and ``calibrated_mean``).
Beside them: the majority class of the sample, and the simplest strong baseline, a logistic
regression on the same MiniLM embeddings trained on 25, 50, 100 (and up to ``--train``)
labelled documents drawn apart from the sample: the learning curve the zero-shot rows are
read against; and tuning with 25, 50 or 100 human labels (the candidate most accurate on
that many sample documents, scored on the rest of the sample). Accuracy with 95% Wilson intervals.

    .venv/bin/python benchmarks/zero_shot.py [--n 300] [--train 100] [--seed 0] [--datasets sms,rt,trec,speeches]
        [--embedding-model-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import time
from pathlib import Path

import numpy as np
from _report import fmt_acc, load_now, machine_facts, print_facts, print_table

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".." / "shared" / "data"
DATASETS = {  # name -> (taxonomy file, data file, label column)
    "sms": ("sms-spam.yaml", "sms_spam.csv", "label"),
    "rt": ("rotten-tomatoes.yaml", "rotten_tomatoes.csv", "label"),
    "trec": ("trec-coarse.yaml", "trec_questions.csv", "coarse"),
    "speeches": ("convention-speeches.yaml", "convention_speeches_2012.csv", "label"),
}
LEARNING_CURVE = (25, 50, 100, 200)  # labelled documents for the supervised baseline (those under --train)
GOLD_DRAWS = 5  # draws of the gold labels that relabel the default job
MIN_SCORED = 80  # sample documents left to score a relabelled job on (so 100 gold labels fit the 189 speeches)
READING = "the LLM's reading"  # its time per document, beside the annotators'
DEMONSTRATION_POOL = 100  # labelled documents the per-document demonstrations are chosen from


def sample(path: Path, column: str, n: int, train: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded sample of ``n`` rows to label and ``train`` other rows for the supervised baseline."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = [{"text": r["text"], "label": r[column]} for r in csv.DictReader(f)]
    random.Random(seed).shuffle(rows)
    train = min(train, len(rows) // 2)  # a small set (189 speeches) keeps half for the sample
    train_rows = rows[-train:] if train else []
    return rows[: min(n, len(rows) - train)], train_rows


def llm_probabilities(engine, labeller, texts: list[str]) -> np.ndarray:
    """The labeller's distributions over its options, one row per text."""
    from service.labelling.labeller import softmax

    requests = [labeller.requests(text)[0][0] for text in texts]
    return np.array([softmax(scores) for scores in engine.score_sync(requests)])


def panel(names: tuple[str, ...], members: dict[str, np.ndarray], taxonomy, method: str, calibrated: set[str],
          weights: dict[str, float] | None = None) -> list:
    """Annotations of the shipped aggregation over annotators' distributions (rows as the store gives them)."""
    from service.labelling.aggregation import aggregate

    rows = []
    for annotator, matrix in members.items():
        for i, probs in enumerate(matrix):
            distribution = dict(zip(names, map(float, probs)))
            rows.append({"doc_id": f"d{i}", "annotator": annotator, "status": "ok", "error": None,
                         "label": max(distribution, key=distribution.get), "distribution": distribution,
                         "abstained": False, "abstain_reason": None})
    out = aggregate(rows, taxonomy, names, method=method, weights={a: 1.0 for a in members} | (weights or {}),
                    calibrated=frozenset(calibrated))
    return [out[f"d{i}"] for i in range(len(next(iter(members.values()))))]


def _matrix(annotations: list, names: tuple[str, ...]) -> np.ndarray:
    """Annotations' distributions as rows over ``names``."""
    return np.array([[a.distribution.get(n, 0.0) for n in names] for a in annotations])


def measure(name: str, engine, embedder, args) -> list[list]:
    """One dataset: every method's (correct, total) as table rows."""
    from sklearn.linear_model import LogisticRegression

    from service.labelling.annotators import EmbeddingLabeller
    from service.labelling.labeller import Labeller, softmax
    from service.labelling.prompts import load_template
    from service.labelling.refinement import refine, with_reading
    from service.labelling.scoring import embedding_scorer, over_text
    from service.labelling.tuning import CONTENT_FREE, beats_chance, candidates, chance_p_value, mutual_information
    from service.settings import Settings
    from service.taxonomy import load_taxonomy
    from service.work.jobs import AUTO_TUNE_DOCUMENTS

    taxonomy_file, data_file, column = DATASETS[name]
    taxonomy = load_taxonomy(args.taxonomy_dir / taxonomy_file)
    rows, train = sample(DATA / data_file, column, args.n, args.train, args.seed)
    texts, truth = [r["text"] for r in rows], [r["label"] for r in rows]
    chars = Settings().model_input_chars
    names = tuple(taxonomy.label_names())
    started = time.perf_counter()
    results: dict[str, list] = {}
    tuned: dict[str, np.ndarray] = {}
    labellers: dict[str, Labeller] = {}
    ms: dict[str, float] = {}  # time per document: each prompt, the embedding annotator and the LLM's reading
    for prompt in candidates(engine.info.engine, None):
        labeller = labellers[prompt] = Labeller(taxonomy, taxonomy.version, load_template(prompt), engine.info, chars)
        clock = time.perf_counter()
        probs = llm_probabilities(engine, labeller, texts)
        ms[prompt] = 1000 * (time.perf_counter() - clock) / len(texts)
        neutral = llm_probabilities(engine, labeller, list(CONTENT_FREE)).mean(axis=0)
        scaled = probs / neutral
        tuned[prompt] = results[prompt] = probs
        tuned[f"{prompt} + contextual calibration"] = scaled / scaled.sum(axis=1, keepdims=True)
    results.update(tuned)
    embedding = EmbeddingLabeller(taxonomy, taxonomy.version, chars, encoder=embedder.identity)
    clock = time.perf_counter()
    scores = asyncio.run(embedding_scorer(embedding, embedder.embed_documents)([embedding.requests(t)[0][0]
                                                                                for t in texts]))
    ms["embedding annotator"] = 1000 * (time.perf_counter() - clock) / len(texts)
    results["embedding annotator"] = np.array([softmax(s) for s in scores])
    reference = results["embedding annotator"].argmax(1)[:AUTO_TUNE_DOCUMENTS]  # what a job's own tuning reads
    by_agreement = max(tuned, key=lambda p: (tuned[p].argmax(1)[:AUTO_TUNE_DOCUMENTS] == reference).mean())
    by_information = max(tuned, key=lambda p: mutual_information([dict(enumerate(row))
                                                                  for row in tuned[p][:AUTO_TUNE_DOCUMENTS]]))
    results[f"tuned without labels on 100 documents: by agreement with embedding ({by_agreement})"] = tuned[by_agreement]
    results[f"tuned without labels on 100 documents: by mutual information ({by_information})"] = tuned[by_information]
    members = {"classify": results["classify"], "embedding": results["embedding annotator"]}
    labels = {method: [names[i] for i in probs.argmax(axis=1)] for method, probs in results.items()}
    labels["panel classify + embedding, weighted_soft_vote"] = [
        a.label for a in panel(names, members, taxonomy, "weighted_soft_vote", set())]
    labels["panel classify + embedding, calibrated_mean"] = [
        a.label for a in panel(names, members, taxonomy, "calibrated_mean", {"classify"})]
    p_value = chance_p_value(np.stack([tuned[p][:AUTO_TUNE_DOCUMENTS] for p in tuned]),
                             results["embedding annotator"][:AUTO_TUNE_DOCUMENTS], list(tuned).index(by_agreement))
    weight = 1.0 if beats_chance(p_value) else 0.0  # as Panels.panel weighs an uninformative LLM
    tuned_members = {"tuned": tuned[by_agreement], "embedding": results["embedding annotator"]}
    default = panel(names, tuned_members, taxonomy, "calibrated_mean", set(), {"tuned": weight})  # tuning calibrated it
    shown = "untestable" if p_value is None else f"{p_value:.3f}"
    labels[f"default panel after tuning (tuned, chance p = {shown}, weight {weight:g}; + embedding, "
           "calibrated_mean)"] = [a.label for a in default]
    vectors = embedder.embed_documents(texts)
    chosen = by_agreement.split(" + ")[0]  # the prompt the default job runs (calibration costs nothing)
    if not weight:  # the service scores a silenced LLM's prompt on its tuning sample only: its job's texts are read
        engine.forget_readings()
    clock = time.perf_counter()
    reading = np.array(engine.read_sync([labellers[chosen].reading_request(t) for t in texts]))  # in the job's prompt
    ms[READING] = 1000 * (time.perf_counter() - clock) / len(texts)
    views = reading if weight else over_text(reading)  # a silenced LLM: over the text only
    features = with_reading(vectors, views)  # as the service refines a job with an LLM (Panels.reader)
    untuned = panel(names, members, taxonomy, "calibrated_mean", {"classify"})
    untuned_reading = np.array(engine.read_sync([labellers["classify"].reading_request(t) for t in texts]))
    for title, voted, views in (
            ("the default job with ANNOTATE_AUTO_TUNE=false", untuned, {"": with_reading(vectors, untuned_reading)}),
            ("the default job (tuned on its first 100 documents)", default,
             {" on the encoder's vectors alone": vectors, "": features})):
        for view, seen in views.items():
            refined, _ = refine(_matrix(voted, names), seen, np.full(len(texts), -1))
            labels[f"{title}: panel refined{view}"] = [names[i] for i in refined.argmax(axis=1)]
    if train:
        train_features = embedder.embed_documents([r["text"] for r in train])
        for size in sorted({n for n in LEARNING_CURVE if n < len(train)} | {len(train)}):
            targets = [r["label"] for r in train[:size]]
            if len(set(targets)) < 2:
                continue
            model = LogisticRegression(max_iter=2000).fit(train_features[:size], targets)
            labels[f"logistic regression on embeddings, {size} labels"] = list(model.predict(vectors))
    majority = max(set(truth), key=truth.count)
    table = [[name, f"majority class ({majority})", fmt_acc(truth.count(majority), len(truth))]]
    for method, predicted in labels.items():
        correct = sum(p == t for p, t in zip(predicted, truth))
        table.append([name, method, fmt_acc(correct, len(truth))])
    if args.demonstrations and train:
        table += with_demonstrations(name, engine, embedder, taxonomy, texts[: args.demonstrations], truth, train)
    table += tuned_with_labels(name, tuned, names, truth, args.seed)
    table += refined_with_labels(name, _matrix(default, names), features, {"embeddings": vectors,
                                                                           "embeddings + LLM reading": features},
                                 names, truth, args.seed)
    print(f"{name}: {len(texts)} documents in {time.perf_counter() - started:.0f} s; labelling ms/doc: the tuned "
          f"prompt ({chosen}) {ms[chosen]:.0f}, the embedding annotator {ms['embedding annotator']:.0f}, "
          f"the LLM's reading for the refinement {ms[READING]:.0f}"
          + (" (kept from scoring the prompt: the same pass)" if weight else
             " (the default job runs the embedding annotator only: the LLM is weighed 0, not scored, so it reads)"),
          flush=True)
    return table


def tuned_with_labels(name: str, tuned: dict[str, np.ndarray], names: tuple[str, ...], truth: list[str],
                      seed: int) -> list[list]:
    """Tuning with N human labels: the candidate most accurate on N sample documents, scored on the others."""
    order = list(range(len(truth)))
    random.Random(seed).shuffle(order)

    def hits(candidate: str, among: list[int]) -> int:
        return sum(names[tuned[candidate][i].argmax()] == truth[i] for i in among)

    rows = []
    for size in (n for n in LEARNING_CURVE if n <= len(truth) // 2):
        chosen_on, rest = order[:size], order[size:]
        pick = max(tuned, key=lambda c, among=chosen_on: hits(c, among))
        rows.append([name, f"tuned with {size} labels ({pick}; scored on the other {len(rest)})",
                     fmt_acc(hits(pick, rest), len(rest))])
    return rows


def with_demonstrations(name: str, engine, embedder, taxonomy, texts: list[str], truth: list[str],
                        train: list[dict]) -> list[list]:
    """classify_fewshot with the taxonomy's fixed examples and with per-document demonstrations (each rule) chosen
    from DEMONSTRATION_POOL labelled documents: accuracy on the first texts of the sample and ms per document."""
    from service.labelling.demonstrations import Demonstrator
    from service.labelling.labeller import Labeller
    from service.labelling.prompts import load_template
    from service.labelling.scoring import annotate_texts, engine_scorer
    from service.settings import Settings
    from service.taxonomy import Demonstrations

    pool = [(r["label"], r["text"]) for r in train[:DEMONSTRATION_POOL]]
    template, chars = load_template("classify_fewshot"), Settings().model_input_chars
    scorer = engine_scorer(engine)
    rows = []
    for rule in (None, "similar", "mmr", "label_diverse"):
        demonstrator = None if rule is None else Demonstrator(pool, Demonstrations(select=rule),
                                                               embedder.embed_documents)
        labeller = Labeller(taxonomy, taxonomy.version, template, engine.info, chars, demonstrator=demonstrator)
        started = time.perf_counter()
        annotations = asyncio.run(annotate_texts(labeller, texts, scorer))
        ms = 1000 * (time.perf_counter() - started) / len(texts)
        hits = sum(a.label == t for a, t in zip(annotations, truth))
        what = "the taxonomy's examples (fixed)" if rule is None else f"{rule}, 4 of {len(pool)} labelled"
        rows.append([name, f"classify_fewshot, demonstrations: {what}; first {len(texts)} documents, {ms:,.0f} ms/doc",
                     fmt_acc(hits, len(texts))])
    return rows


def refined_with_labels(name: str, probs: np.ndarray, features: np.ndarray, views: dict[str, np.ndarray],
                        names: tuple[str, ...], truth: list[str], seed: int) -> list[list]:
    """The default job relabelled with N gold labels (``service.labelling.refinement``, reading ``features``) beside
    logistic regressions on them alone, one per view of the documents.

    All learn the same N sample documents and are scored on the rest of the sample, over
    ``GOLD_DRAWS`` draws of the N (one draw moves a cell by several points): the mean, and
    the lowest and highest draw.
    """
    from sklearn.linear_model import LogisticRegression

    from service.labelling.refinement import refine

    rows = []
    for size in (n for n in LEARNING_CURVE if n <= len(truth) - MIN_SCORED):
        scores: dict[str, list[float]] = {"refined": [], **{view: [] for view in views}}
        for draw in range(GOLD_DRAWS):
            order = list(range(len(truth)))
            random.Random(seed + 1 + draw).shuffle(order)
            gold, rest = order[:size], order[size:]
            if len({truth[i] for i in gold}) < 2:
                continue
            gold_index = np.full(len(truth), -1)
            gold_index[gold] = [names.index(truth[i]) for i in gold]
            refined, _ = refine(probs, features, gold_index, seed=seed)
            scores["refined"].append(np.mean([names[refined[i].argmax()] == truth[i] for i in rest]))
            for view, seen in views.items():
                model = LogisticRegression(max_iter=2000).fit(seen[gold], [truth[i] for i in gold])
                scores[view].append(np.mean(model.predict(seen[rest]) == np.array([truth[i] for i in rest])))
        for key, label in (("refined", f"default job relabelled with {size} gold labels (refined, trained on them)"),
                           *((view, f"logistic regression on the same {size} gold labels alone, over the {view}")
                             for view in views)):
            values = scores[key]
            if values:
                rows.append([name, f"{label}; scored on the other {len(truth) - size}, {len(values)} draws",
                             f"{np.mean(values):.1%} [{min(values):.1%}, {max(values):.1%}] (mean [lowest, highest])"])
    return rows


def main() -> None:
    """Parse flags, label every dataset with every method, print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="documents labelled per dataset (all speeches if fewer)")
    parser.add_argument("--train", type=int, default=200,
                        help="labelled documents for the supervised baseline (its largest point; fewer for the speeches)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples")
    parser.add_argument("--demonstrations", type=int, default=0, metavar="N",
                        help="also label the first N sample documents with per-document demonstrations (slow: "
                             "each document's prompt is its own)")
    parser.add_argument("--embedding-model-dir", type=Path, default=None,
                        help="a sentence-transformers checkpoint to read documents with (ANNOTATE_EMBEDDING_MODEL_DIR; "
                             "default: the packaged MiniLM)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, from " + ", ".join(DATASETS))
    parser.add_argument("--taxonomy-dir", type=Path, default=ROOT / "taxonomy",
                        help="where the datasets' taxonomy files are (same file names), e.g. benchmarks/taxonomies/terse "
                             "for one-line descriptions without examples")
    args = parser.parse_args()
    from service.engines.embedded import EmbeddedEngine
    from service.engines.embeddings import Embedder
    from service.settings import Settings

    settings = Settings()
    engine = EmbeddedEngine(settings.models_dir, threads=settings.engine_threads, dtype=settings.engine_dtype)
    embedder = Embedder(args.embedding_model_dir)
    table = []
    for name in [part.strip() for part in args.datasets.split(",") if part.strip()]:
        if not (DATA / DATASETS[name][1]).exists():
            print(f"{name}: skipped, {DATA / DATASETS[name][1]} not found")
            continue
        table += measure(name, engine, embedder, args)
    print_facts("Zero-shot label quality, in-process", [
        *machine_facts(), f"engine: {engine.info.model}, {engine.numeric.dtype}; embedding annotator: {embedder.identity}",
        f"samples: seed {args.seed}, up to {args.n} documents per dataset; baseline trained on {args.train} others",
        f"taxonomies: {args.taxonomy_dir}",
        load_now()])
    print_table(["dataset", "method (no human label unless stated)", "accuracy [95% CI]"], table,
                "Every method labels the same documents; the panels aggregate the classify and embedding rows above.")


if __name__ == "__main__":
    main()
