"""Large taxonomies: scoring every leaf against shortlists and top-down scoring, at 6, 50 and 500 labels.

Real questions of ``../shared/data/trec_questions.csv``: a seeded sample of ``--n`` to label,
and ``--labelled`` others as the human labels a shortlist calibrates on (the retriever's
labelled neighbours and the set its K is chosen on, as the service uses a taxonomy's gold).
Three taxonomies from the same labels:

- 6: ``taxonomy/trec-coarse.yaml``;
- 50: ``taxonomy/trec-questions.yaml`` (6 parents, 50 leaves);
- 500: that tree with each of the 50 leaves split into 10 sub-labels by the question's first
  words (what, which, who, when, where, why, how many, how much, other how, anything else),
  each with its own description; a question's gold sub-label is its fine label and its
  opening, both real, so no accuracy is invented (``split_taxonomy``).

Methods, all in-process through the service's labelling path (``service.work.jobs.annotate_texts``
on the embedded SmolLM2 engine, batches of 16 as a job's): scoring every leaf (where it fits
the model's context), shortlisting at the K calibrated for 98% recall on the labelled texts,
at most 10, and top-down (parents, then children; the 50- and 500-label trees), both with
the prompt the service chooses (``service.labelling.labeller.shortlist_prompting``). Printed per row:
docs/s, p50 latency per batch document, prompt tokens per document (system + user, the scored
continuations excluded), the shortlist recall on the sample (true leaf among those scored),
and accuracy with 95% Wilson intervals (for 500 labels also rolled up to the 50 fine labels).

    .venv/bin/python benchmarks/large_taxonomies.py [--n 150] [--labelled 300] [--seed 0] [--sizes 6,50,500]
        [--methods every,shortlist,top-down] [--prompt classify_shortlist]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import time
from pathlib import Path

import yaml
from _report import fmt, fmt_acc, load_now, machine_facts, percentile, print_facts, print_table

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".." / "shared" / "data" / "trec_questions.csv"
OPENINGS = (("how many", "How many"), ("how much", "How much"), ("what", "What"), ("which", "Which"),
            ("who", "Who"), ("when", "When"), ("where", "Where"), ("why", "Why"), ("how", "another How"))
OTHER = "other"  # the tenth sub-label: any other opening ("Name ...", "In what ...")
BATCH = 16
CONTEXT_TOKENS = 8192  # SmolLM2's context


def opening(text: str) -> str:
    """The sub-label a question's first words give it."""
    lowered = text.lower().lstrip()
    return next((key for key, _ in OPENINGS if lowered.startswith(key + " ")), OTHER)


def split_taxonomy(base: dict) -> dict:
    """The 50-leaf tree with every leaf a parent of 10 sub-labels by opening: 500 leaves, 3 levels."""
    labels = []
    for label in base["labels"]:
        labels.append(label)
        if label.get("parent"):
            for key, words in OPENINGS:
                labels.append({"name": f"{label['name']}/{key.replace(' ', '-')}", "parent": label["name"],
                               "description": f"{label['description']} The question begins with {words}."})
            labels.append({"name": f"{label['name']}/{OTHER}", "parent": label["name"],
                           "description": f"{label['description']} The question begins with none of What, Which, "
                                          "Who, When, Where, Why or How."})
    return {**base, "name": "trec-split", "labels": labels}


def leaf_of(row: dict, size: int) -> str:
    """A question's gold leaf in the taxonomy of ``size`` labels."""
    if size == 6:
        return row["coarse"]
    if size == 50:
        return row["fine"]
    return f"{row['fine']}/{opening(row['text']).replace(' ', '-')}"


def run(labeller, engine, texts: list[str]) -> tuple[list, list[float], float]:
    """Annotations of ``texts`` in job-sized batches, per-document latencies (ms) and the total seconds."""
    from service.labelling.scoring import annotate_texts, engine_scorer

    scorer = engine_scorer(engine)
    annotations, latencies = [], []
    started = time.perf_counter()
    for start in range(0, len(texts), BATCH):
        chunk = texts[start:start + BATCH]
        t = time.perf_counter()
        annotations += asyncio.run(annotate_texts(labeller, chunk, scorer))
        latencies += [1000 * (time.perf_counter() - t) / len(chunk)] * len(chunk)
    return annotations, latencies, time.perf_counter() - started


def shortlisting(taxonomy, shortlister, strategy: str, engine, prompt: str | None):
    """A shortlisting labeller with the prompt the service would choose (or ``prompt``)."""
    from service.labelling.labeller import Labeller, shortlist_prompting
    from service.labelling.prompts import load_template
    from service.settings import Settings

    settings = Settings()
    default, whole = shortlist_prompting(taxonomy, strategy, settings.max_scored_labels)
    return Labeller(taxonomy, "1", load_template(prompt or default), engine.info, settings.model_input_chars,
                    shortlister=shortlister, whole_prompt=whole and prompt is None)


def prompt_tokens(engine, labeller, texts: list[str], shortlists: list | None) -> float:
    """Mean tokens of the prompt (system + user) a document is scored with."""
    counts = []
    for i, text in enumerate(texts):
        request = labeller.requests(text, shortlists[i])[0][0] if shortlists else labeller.requests(text)[0][0]
        counts.append(len(engine.tokenizer(request.system + request.user)["input_ids"]))
    return sum(counts) / len(counts)


def main() -> None:
    """Every taxonomy size and method, one table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=150)
    parser.add_argument("--labelled", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", default="6,50,500", help="taxonomy sizes to run, comma-separated")
    parser.add_argument("--methods", default="every,shortlist,top-down", help="methods to run, comma-separated")
    parser.add_argument("--prompt", help="the shortlisted methods' prompt template (default: the service's choice)")
    args = parser.parse_args()
    sizes, methods = {int(n) for n in args.sizes.split(",")}, set(args.methods.split(","))

    from service.engines.embedded import EmbeddedEngine
    from service.engines.embeddings import shared_embedder
    from service.labelling.labeller import Labeller
    from service.labelling.prompts import load_template
    from service.labelling.shortlist import Shortlister, TopDown
    from service.settings import Settings
    from service.taxonomy import parse_taxonomy

    if not DATA.exists():
        print_facts("Large taxonomies", [f"skipped: {DATA} not found"])
        return
    with DATA.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    random.Random(args.seed).shuffle(rows)
    sample, pool = rows[: args.n], rows[args.n: args.n + args.labelled]
    texts = [r["text"] for r in sample]
    base = yaml.safe_load((ROOT / "taxonomy" / "trec-questions.yaml").read_text())
    taxonomies = {6: parse_taxonomy((ROOT / "taxonomy" / "trec-coarse.yaml").read_text()),
                  50: parse_taxonomy(yaml.safe_dump(base)), 500: parse_taxonomy(yaml.safe_dump(split_taxonomy(base)))}
    settings = Settings()
    engine = EmbeddedEngine(settings.models_dir)
    embed = shared_embedder().embed
    template = load_template("classify")
    table = []
    for size, taxonomy in taxonomies.items():
        if size not in sizes:
            continue
        truth = [leaf_of(r, size) for r in sample]
        labelled = [(r["text"], leaf_of(r, size)) for r in pool]
        plans: dict = {}
        whole = Labeller(taxonomy, "1", template, engine.info, settings.model_input_chars)
        whole_tokens = len(engine.tokenizer(whole.system)["input_ids"])
        if "every" in methods and whole_tokens < CONTEXT_TOKENS // 2:
            plans["every leaf"] = whole
        elif "every" in methods:
            table.append([size, "every leaf", "does not fit", "", fmt(whole_tokens, 0), "", "", ""])
        retriever = Shortlister(taxonomy, embed, k="auto", recall=0.98, labelled=labelled)
        calibration = retriever.calibration
        if "shortlist" in methods:
            plans[f"shortlist, K={retriever.k} ({100 * calibration.recall:.0f}% of {calibration.n} labelled)"] = \
                shortlisting(taxonomy, retriever, "retrieve", engine, args.prompt)
        if "top-down" in methods and any(label.parent for label in taxonomy.labels):
            top_down = TopDown(taxonomy)
            plans["top-down (parents, then children)"] = shortlisting(taxonomy, top_down, "top_down", engine, args.prompt)
        for method, labeller in plans.items():
            run(labeller, engine, texts[:BATCH])  # warm-up: shared prefixes and kernels
            annotations, latencies, seconds = run(labeller, engine, texts)
            shortlists = [a.shortlist for a in annotations]
            recall = (sum(t in s for t, s in zip(truth, shortlists)) / len(truth)) if shortlists[0] else 1.0
            correct = sum(a.label == t for a, t in zip(annotations, truth))
            rolled = "" if size != 500 else fmt_acc(sum((a.label or "").split("/")[0] == t.split("/")[0]
                                                        for a, t in zip(annotations, truth)), len(truth))
            tokens = prompt_tokens(engine, labeller, texts[:50],
                                   [tuple(s) for s in shortlists[:50]] if shortlists[0] else None)
            table.append([size, method, fmt(len(texts) / seconds, 2), fmt(percentile(latencies, 50), 0),
                          fmt(tokens, 0), fmt(100 * recall, 1), fmt_acc(correct, len(truth)), rolled])
    print_facts("Large taxonomies: every leaf, a shortlist, top-down (TREC questions, embedded SmolLM2)", [
        f"shortlisted prompt: {args.prompt or 'the service default (service.labelling.labeller.shortlist_prompting)'}",
        *machine_facts(), f"{len(texts)} questions (seed {args.seed}); {len(pool)} others as the labelled texts a "
        "shortlist calibrates on; batches of 16 through service.work.jobs.annotate_texts; numeric path "
        f"{engine.numeric.dtype}", load_now()])
    print_table(["labels", "method", "docs/s", "ms/doc p50", "prompt tokens/doc", "shortlist recall %",
                 "accuracy", "accuracy rolled up to 50"], table,
                "Prompt tokens: system + user of the prompt a document is scored with (for 'does not fit', the "
                "system prompt listing every leaf). Shortlist recall: the true leaf among the leaves scored.")


if __name__ == "__main__":
    main()
