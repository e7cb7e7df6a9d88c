"""Taxonomy induction on TREC questions, scored against the gold coarse labels.

Induces a taxonomy from the texts of ``../shared/data/trec_questions.csv`` (gold labels
hidden) with the service's induction (embedded SmolLM2 + all-MiniLM-L6-v2), and scores
how its labels partition the questions against the 6 gold coarse classes with standard
clustering-agreement measures: adjusted Rand index (ARI), normalised mutual information
(NMI) and the best one-to-one matching accuracy (Hungarian assignment of induced labels
to gold classes). Two baselines run in the same script on the same sample:

- k-means on the same embeddings (k = the number of labels induced), no LLM;
- a keyword topic baseline: TF-IDF vectors clustered with k-means, each topic named by
  its c-TF-IDF keywords (BERTopic's recipe without the embeddings).

The induced taxonomy is scored twice: by the groups it was induced from (each document
in its group's label) and by labelling documents with the induced taxonomy through the
real labeller (scoring each label's likelihood), which is how the taxonomy is used.

    .venv/bin/python benchmarks/taxonomy_induction.py [--n 1000] [--k 6] [--label-n 300]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.engines.embedded import EmbeddedEngine  # noqa: E402
from service.engines.embeddings import Embedder  # noqa: E402
from service.induction.inducer import Inducer, InductionOptions, ctfidf_keywords  # noqa: E402
from service.labelling.labeller import Labeller  # noqa: E402
from service.labelling.prompts import load_template  # noqa: E402
from service.labelling.scoring import annotate_texts, engine_scorer  # noqa: E402
from service.settings import Settings  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "trec_questions.csv"


def one_to_one_accuracy(gold: list[str], predicted: list[str]) -> float:
    """Accuracy under the best one-to-one matching of predicted labels to gold classes."""
    gold_ids = {g: i for i, g in enumerate(sorted(set(gold)))}
    pred_ids = {p: i for i, p in enumerate(sorted(set(predicted)))}
    table = np.zeros((len(pred_ids), len(gold_ids)))
    for g, p in zip(gold, predicted):
        table[pred_ids[p], gold_ids[g]] += 1
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(gold))


def scores(gold: list[str], predicted: list[str]) -> tuple[float, float, float]:
    """(ARI, NMI, one-to-one accuracy)."""
    return (adjusted_rand_score(gold, predicted), normalized_mutual_info_score(gold, predicted),
            one_to_one_accuracy(gold, predicted))


def load(n: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded random sample of TREC questions and their gold coarse labels."""
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs ../shared/data (see its README)")
    rows = list(csv.DictReader(DATA.open()))
    picked = np.random.default_rng(seed).choice(len(rows), min(n, len(rows)), replace=False)
    return [rows[i]["text"] for i in picked], [rows[i]["coarse"] for i in picked]


def keyword_topics(texts: list[str], k: int, seed: int) -> tuple[list[str], list[list[str]]]:
    """TF-IDF + k-means topics, named by c-TF-IDF keywords."""
    vectors = TfidfVectorizer(stop_words="english", min_df=2).fit_transform(texts)
    topics = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(vectors)
    names = ctfidf_keywords([[t for t, c in zip(texts, topics) if c == topic] for topic in range(k)], top=3)
    return ["_".join(names[c][:2]) or f"topic_{c}" for c in topics], names


async def induce(texts: list[str], args, embedder: Embedder, engine: EmbeddedEngine):
    """The service's induction on the sample, and the induced taxonomy's labels through the real labeller."""
    inducer = Inducer(embedder.embed, engine.generate_json, engine_scorer(engine), engine.info,
                      progress=lambda stage, f: print(f"  induction: {stage} {f:.0%}", file=sys.stderr))
    options = InductionOptions(name="trec-induced", max_labels=args.k,
                               report_size=min(args.label_n, 100), seed=args.seed)
    result = await inducer.run(texts, options, source=f"{len(texts)} TREC questions (texts only)")
    labeller = Labeller(result.taxonomy, result.taxonomy.content_hash(), load_template("classify"), engine.info, 2000)
    started = time.perf_counter()
    labelled = await annotate_texts(labeller, texts[: args.label_n], engine_scorer(engine))
    label_s = time.perf_counter() - started
    return result, [a.label or "abstained" for a in labelled], label_s


def main() -> None:
    """Run induction and both baselines on one sample; print the table and the induced YAML."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="questions sampled (default 1000)")
    parser.add_argument("--k", type=int, default=6, help="most labels to induce (gold has 6 coarse classes)")
    parser.add_argument("--label-n", type=int, default=300, help="questions labelled with the induced taxonomy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    texts, gold = load(args.n, args.seed)
    settings = Settings()
    embedder, engine = Embedder(), EmbeddedEngine(settings.models_dir)
    started = time.perf_counter()
    vectors = embedder.embed(texts)
    embed_s = time.perf_counter() - started
    started = time.perf_counter()
    result, labelled, label_s = asyncio.run(induce(texts, args, embedder, engine))
    induce_s = time.perf_counter() - started - label_s
    k = len(result.taxonomy.labels)
    kmeans = [str(c) for c in KMeans(n_clusters=k, n_init=4, random_state=args.seed).fit_predict(vectors)]
    keywords, _ = keyword_topics(texts, k, args.seed)
    majority = [max(set(gold), key=gold.count)] * len(gold)
    rows = [
        ("induced taxonomy: its groups", len(texts), gold, [a or "?" for a in result.assignment], f"{induce_s:.0f}"),
        ("induced taxonomy: LLM labeller", args.label_n, gold[: args.label_n], labelled, f"{label_s:.0f}"),
        (f"k-means on the same embeddings (k={k})", len(texts), gold, kmeans, f"{embed_s:.0f} (embedding)"),
        (f"keywords: TF-IDF k-means + c-TF-IDF (k={k})", len(texts), gold, keywords, ""),
        ("majority class (all ENTY-like)", len(texts), gold, majority, ""),
    ]
    print(f"\nTREC coarse (6 gold classes), {len(texts)} questions, seed {args.seed}, {k} labels induced\n")
    print("| method | docs | ARI | NMI | 1:1 accuracy | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, g, predicted, seconds in rows:
        ari, nmi, acc = scores(g, predicted)
        print(f"| {name} | {n} | {ari:.3f} | {nmi:.3f} | {acc:.1%} | {seconds} |")
    print("\nInduced taxonomy:\n")
    print(result.yaml)


if __name__ == "__main__":
    main()
