"""Taxonomy induction: from a raw corpus to an editable taxonomy YAML, in the spirit of TnT-LLM.

TnT-LLM (Wan et al. 2024) has an LLM summarise documents, propose labels on mini-batches,
merge and refine them, then review the result for coverage, distinctness and clarity.
A 135M model cannot carry that loop, so the default ``embedding`` method grounds every
step in sentence embeddings and asks the LLM only what it can answer from evidence:

1. sample the corpus; embed the sample (MiniLM, or the configured encoder);
2. cluster with k-means into at most K groups (over-clustering to 2K and merging
   centroids by average linkage was tried: it lowered agreement with gold classes on
   TREC, ARI 0.11 vs 0.20); groups under ``min_share`` of the sample fold into their
   nearest neighbour;
3. per group, the documents nearest its centroid (representatives) and those nearest
   another group (boundary cases) go to the LLM, which names and describes the label
   under a JSON schema;
4. labels whose names coincide or whose descriptions embed within ``merge_similarity``
   are merged; names are checked and made unique (falling back to the group's
   c-TF-IDF keywords when the model's name is unusable);
5. review: the induced taxonomy labels a report sample with the real labeller, which
   gives coverage and which labels it confuses (how often a document's top two are
   that pair); the "other" estimate is the share of the sample far from every label's
   centroid (and, with ``allow_none``, how often the labeller picks none-of-these).

With ``base`` (an existing taxonomy) the groups that an existing label already covers
are attached to it, only the rest become proposed additions, and labels the labeller
confuses are proposed merges: the taxonomy evolves instead of starting over.
The ``llm`` method (``method="llm"``) is TnT-LLM's own mini-batch loop for strong
models behind the OpenAI-compatible engine: the model updates the whole label list
batch by batch (JSON schema with arrays), then the same review runs.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import yaml

from service.engines.base import EngineInfo
from service.engines.embeddings import MODEL_ID
from service.induction.naming import STOP_WORDS, WORD, ctfidf_keywords, first_sentence, slug, snippets, spoken
from service.labelling.labeller import Labeller
from service.labelling.prompts import load_template
from service.labelling.scoring import Scorer, annotate_texts
from service.taxonomy import NONE_LABEL, Taxonomy, parse_taxonomy

log = logging.getLogger(__name__)

Embed = Callable[[list[str]], np.ndarray]
Generate = Callable[..., Awaitable[dict]]  # (system, user, schema, *, max_tokens=...) -> the parsed JSON
Progress = Callable[[str, float], None]

NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                 "description": {"type": "string", "maxLength": 200}},
               "required": ["name", "description"]}
LIST_MAX_TOKENS = 1024


def _list_schema(max_labels: int) -> dict:
    """JSON schema of TnT-LLM's label list: at most ``max_labels`` short named descriptions."""
    label = {"type": "object", "required": ["name", "description"],
             "properties": {"name": {"type": "string", "maxLength": 40},
                            "description": {"type": "string", "maxLength": 160}}}
    return {"type": "object", "required": ["labels"],
            "properties": {"labels": {"type": "array", "items": label, "maxItems": max_labels}}}
NAMING_SYSTEM = ("You organise texts into categories. You see texts from one group and a few texts near its "
                 "border. Give the group a short general category name (1 to 3 words, like 'sports' or "
                 "'person names') and a one-sentence description of what belongs in it.")
GROUNDED_SHARE = 0.15  # a name's words must each occur in this share of its group's documents (and in 2)
PROMPT_WORDS = frozenset({"frequent", "words", "group", "texts", "text", "border", "name", "describe"})


@dataclass(frozen=True)
class InductionOptions:
    """What to induce and how."""

    name: str
    max_labels: int = 8
    report_size: int = 200
    examples: int = 3
    seed: int = 0
    method: str = "embedding"
    merge_similarity: float = 0.85  # label descriptions at least this similar are one label
    attach_similarity: float = 0.55  # a group this close to an existing label belongs to it
    min_share: float = 0.02  # groups smaller than this share of the sample fold into their nearest
    allow_none: bool = False  # add none_of_these; small models then pick it for nearly everything
    outlier_similarity: float = 0.3  # a document less similar than this to every label's centroid is "other"

    def __post_init__(self):
        if self.method not in ("embedding", "llm"):
            raise ValueError(f"unknown induction method {self.method!r}; use 'embedding' or 'llm'")


@dataclass
class _Group:
    """A candidate label: its documents in the sample and what the LLM called it."""

    members: list[int]
    centroid: np.ndarray
    name: str = ""
    description: str = ""
    examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Induction:
    """The result: the taxonomy, its YAML (with a provenance header) and the review report."""

    taxonomy: Taxonomy
    yaml: str
    report: dict
    assignment: list[str | None]  # per sampled document (in corpus order): the label whose group holds it


class Inducer:
    """Runs induction with the given embedder, generator and labeller scorer (any engine)."""

    def __init__(self, embed: Embed, generate: Generate, scorer: Scorer, engine: EngineInfo, *,
                 model_input_chars: int = 2000, progress: Progress = lambda stage, fraction: None,
                 encoder: str = MODEL_ID):
        self.embed = embed
        self.encoder = encoder  # Embedder.identity of ``embed``, for the YAML header
        self.generate = generate
        self.scorer = scorer
        self.engine = engine
        self.model_input_chars = model_input_chars
        self.progress = progress

    async def run(self, texts: list[str], options: InductionOptions, *, source: str,
                  base: Taxonomy | None = None, corpus_size: int | None = None) -> Induction:
        """Induce a taxonomy from a sample of a corpus (or extend ``base``) and review it; ``corpus_size``: the corpus's."""
        sample = [t for t in texts if t.strip()]  # callers sample (``sample_texts``); this is the sample
        if len(sample) < 2:
            raise ValueError("induction needs at least 2 non-empty documents")
        self.progress("embedding", 0.05)
        vectors = await asyncio.to_thread(self.embed, sample)
        self.progress("clustering", 0.2)
        if options.method == "llm":  # the loop starts from the base's labels and may rewrite them
            groups = await self._llm_loop(sample, options, base)
            await self._assign(groups, vectors)
            attached: dict[str, list[int]] = {}
            base = None
        else:
            groups = _cluster(vectors, options)
            groups, attached = await self._attach(groups, base, options)
            await self._name(groups, sample, vectors)
            groups = await self._merge(groups, options)
        for group in groups:
            group.examples = snippets([sample[i] for i in _nearest(group, vectors)[: options.examples]])
        taxonomy = _taxonomy(groups, options, base)
        self.progress("reviewing", 0.8)
        report = await self._review(taxonomy, sample, options)
        similarity = (vectors @ np.stack([g.centroid for g in groups]).T).max(1) if groups else None
        report.update(sample_size=len(sample), corpus_size=corpus_size or len(sample),
                      outlier_share=None if similarity is None else
                      round(float((similarity < options.outlier_similarity).mean()), 4),
                      sample_shares={g.name: round(len(g.members) / len(sample), 4) for g in groups},
                      attached_to_existing={name: len(m) for name, m in attached.items()},
                      proposed_additions=[g.name for g in groups] if base else [])
        if base:
            report["proposed_merges"] = [p for p in report["confusable_pairs"] if p["share"] >= 0.15]
        assignment: list[str | None] = [None] * len(sample)
        for name, members in [(g.name, g.members) for g in groups] + list(attached.items()):
            for i in members:
                assignment[i] = name
        self.progress("done", 1.0)
        return Induction(taxonomy, _yaml(taxonomy, options, source, self.engine, self.encoder, report), report, assignment)

    async def _attach(self, groups: list[_Group], base: Taxonomy | None,
                      options: InductionOptions) -> tuple[list[_Group], dict[str, list[int]]]:
        """Groups an existing label already covers join it; the rest stay new."""
        if base is None:
            return groups, {}
        leaves = base.leaves()
        label_vectors = await asyncio.to_thread(
            self.embed, [spoken(leaf.name, f"{leaf.description} {' '.join(leaf.examples)}") for leaf in leaves])
        attached: dict[str, list[int]] = {}
        new = []
        for group in groups:
            similarity = label_vectors @ group.centroid
            best = int(similarity.argmax())
            if similarity[best] >= options.attach_similarity:
                attached.setdefault(leaves[best].name, []).extend(group.members)
            else:
                new.append(group)
        return new, attached

    async def _name(self, groups: list[_Group], sample: list[str], vectors: np.ndarray) -> None:
        """Name and describe each group with the LLM, keeping only answers grounded in their group.

        The model sees the group's representative and boundary documents and its c-TF-IDF
        keywords. Its answer is kept only if it is grounded: every word of the name occurs in
        several of the group's documents (``GROUNDED_SHARE``), and the answer's embedding lies closer to its own group's
        centroid than to any other (a small model often describes one document, echoes the
        prompt or invents); otherwise the keywords name and describe the group.
        """
        if not groups:
            return
        keywords = ctfidf_keywords([[sample[i] for i in g.members] for g in groups])
        centroids = np.stack([g.centroid for g in groups])
        for n, group in enumerate(groups):
            representatives = [sample[i] for i in _nearest(group, vectors)[:6]]
            boundary = [sample[i] for i in _boundary(group, vectors, centroids, n)[:2]]
            user = (f"Frequent words: {', '.join(keywords[n])}\nTexts in the group:\n"
                    + "\n".join(f"- {t[:200]}" for t in representatives)
                    + ("\nTexts near its border:\n" + "\n".join(f"- {t[:200]}" for t in boundary) if boundary else "")
                    + "\nName and describe the whole group, not one text.")
            reply = await self.generate(NAMING_SYSTEM, user, NAME_SCHEMA)
            group.name = slug(str(reply.get("name", "")))
            group.description = first_sentence(str(reply.get("description", "")))
            self.progress("naming", 0.3 + 0.4 * (n + 1) / len(groups))
        answers = await asyncio.to_thread(self.embed, [spoken(g.name, g.description) for g in groups])
        for n, (group, answer) in enumerate(zip(groups, answers)):
            documents = [set(WORD.findall(sample[i].lower())) for i in group.members]
            named = [w for w in group.name.split("_") if w not in STOP_WORDS]
            needed = max(2, GROUNDED_SHARE * len(documents))
            lexical = named and not set(named) & PROMPT_WORDS and \
                all(sum(w in d for d in documents) >= needed for w in named)
            if not lexical or not group.description or int((centroids @ answer).argmax()) != n:
                group.name = slug("_".join(keywords[n][:2])) or f"label_{n + 1}"
                group.description = f"Texts about {', '.join(keywords[n][:4])}."
        _unique_names(groups, keywords)

    async def _merge(self, groups: list[_Group], options: InductionOptions) -> list[_Group]:
        """Merge labels with the same name or near-identical descriptions (the larger one's wording wins)."""
        if len(groups) < 2:
            return groups
        described = await asyncio.to_thread(self.embed, [spoken(g.name, g.description) for g in groups])
        merged: list[tuple[_Group, np.ndarray]] = []
        for group, vector in sorted(zip(groups, described), key=lambda p: -len(p[0].members)):
            twin = next((m for m in merged if m[0].name == group.name
                         or float(m[1] @ vector) >= options.merge_similarity), None)
            if twin is None:
                merged.append((group, vector))
                continue
            keep = twin[0]
            size = len(keep.members) + len(group.members)
            keep.centroid = _unit((keep.centroid * len(keep.members) + group.centroid * len(group.members)) / size)
            keep.members = keep.members + group.members
        return [g for g, _ in merged]

    async def _llm_loop(self, sample: list[str], options: InductionOptions, base: Taxonomy | None) -> list[_Group]:
        """TnT-LLM's mini-batch loop: the model rewrites the whole label list after each batch."""
        labels = [{"name": leaf.name, "description": leaf.description} for leaf in (base.leaves() if base else [])]
        batch = 20
        for start in range(0, len(sample), batch):
            current = "\n".join(f"- {label['name']}: {label['description']}" for label in labels) or "(none yet)"
            user = (f"Current labels:\n{current}\n\nNew texts:\n"
                    + "\n".join(f"- {t[:300]}" for t in sample[start:start + batch])
                    + f"\n\nUpdate the label list so it covers all texts seen, with at most {options.max_labels} "
                      "distinct, clearly described labels. Merge overlapping labels.")
            try:
                reply = await self.generate("You build a taxonomy of texts, iteratively.", user,
                                            _list_schema(options.max_labels), max_tokens=LIST_MAX_TOKENS)
            except ValueError as exc:
                raise ValueError(f"method 'llm' needs a model that writes JSON lists (a server model behind the "
                                 f"OpenAI-compatible engine): {exc}") from exc
            labels = [label for label in reply.get("labels", [])
                      if isinstance(label, dict) and label.get("name")][: options.max_labels]
            self.progress("proposing", 0.2 + 0.5 * min(1.0, (start + batch) / len(sample)))
        groups = [_Group([], np.zeros(1), slug(str(label["name"])), str(label.get("description", ""))) for label in labels]
        _unique_names(groups, [[] for _ in groups])
        return [g for g in groups if g.name]

    async def _assign(self, groups: list[_Group], vectors: np.ndarray) -> None:
        """Give LLM-proposed labels their sample documents: each document joins the most similar description."""
        if not groups:
            raise ValueError("the model proposed no labels")
        described = await asyncio.to_thread(self.embed, [spoken(g.name, g.description) for g in groups])
        nearest = (vectors @ described.T).argmax(1)
        for n, group in enumerate(groups):
            group.members = [int(i) for i in np.flatnonzero(nearest == n)]
            group.centroid = _unit(vectors[group.members].mean(0)) if group.members else described[n]

    async def _review(self, taxonomy: Taxonomy, sample: list[str], options: InductionOptions) -> dict:
        """Label a report sample with the induced taxonomy: coverage, none share, confusable pairs."""
        template = load_template("classify_multi" if taxonomy.multi_label else "classify")
        labeller = Labeller(taxonomy, taxonomy.content_hash(), template, self.engine, self.model_input_chars)
        texts = sample[: options.report_size]
        annotations = await annotate_texts(labeller, texts, self.scorer)
        scored = [a for a in annotations if a.status == "ok"]
        pairs: Counter = Counter()
        for a in scored:
            top = sorted(a.distribution, key=a.distribution.__getitem__, reverse=True)[:2]
            if len(top) == 2 and NONE_LABEL not in top:
                pairs[tuple(sorted(top))] += 1
        total = max(len(scored), 1)
        return {
            "report_size": len(texts),
            "coverage": round(sum(not a.abstained for a in scored) / total, 4),
            "none_share": round(sum(a.abstain_reason == "out_of_taxonomy" for a in scored) / total, 4)
            if taxonomy.abstention.allow_none else None,
            "labelled_shares": {name: round(sum(a.label == name for a in scored) / total, 4)
                                for name in taxonomy.label_names()},
            "confusable_pairs": [{"a": a, "b": b, "share": round(n / total, 4)} for (a, b), n in pairs.most_common(10)],
        }


def sample_texts(rows: Iterable[dict], size: int, seed: int) -> tuple[list[str], int]:
    """A uniform sample of at most ``size`` texts from a stream of any length (reservoir), and the stream's length."""
    rng = random.Random(seed)
    sample: list[str] = []
    count = 0
    for count, row in enumerate(rows, start=1):
        if len(sample) < size:
            sample.append(row["text"])
        elif (slot := rng.randrange(count)) < size:
            sample[slot] = row["text"]
    return sample, count


def _cluster(vectors: np.ndarray, options: InductionOptions) -> list[_Group]:
    """k-means into at most K groups; groups under ``min_share`` of the sample fold into their nearest."""
    from sklearn.cluster import KMeans

    n = len(vectors)
    kmeans = KMeans(n_clusters=min(options.max_labels, n), n_init=8, random_state=options.seed).fit(vectors)
    groups = [_group(list(np.flatnonzero(kmeans.labels_ == c)), vectors) for c in np.unique(kmeans.labels_)]
    while len(groups) > 2:
        smallest = min(groups, key=lambda g: len(g.members))
        if len(smallest.members) >= options.min_share * n:
            break
        groups.remove(smallest)
        nearest = max(groups, key=lambda g: float(g.centroid @ smallest.centroid))
        groups[groups.index(nearest)] = _group(nearest.members + smallest.members, vectors)
    return groups


def _group(members: list[int], vectors: np.ndarray) -> _Group:
    """A group with its unit centroid."""
    return _Group([int(i) for i in members], _unit(vectors[members].mean(0)))


def _unit(vector: np.ndarray) -> np.ndarray:
    """``vector`` scaled to length 1."""
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _nearest(group: _Group, vectors: np.ndarray) -> list[int]:
    """The group's members, nearest its centroid first."""
    return sorted(group.members, key=lambda i: -float(vectors[i] @ group.centroid))


def _boundary(group: _Group, vectors: np.ndarray, centroids: np.ndarray, own: int) -> list[int]:
    """The group's members closest to another group's centroid (smallest margin) first."""
    if len(centroids) < 2:
        return []
    others = np.delete(centroids, own, axis=0)
    return sorted(group.members, key=lambda i: float(vectors[i] @ group.centroid - (others @ vectors[i]).max()))


def _unique_names(groups: list[_Group], keywords: list[list[str]]) -> None:
    """Make names distinct by appending each group's best keyword (or a number)."""
    seen: Counter = Counter(g.name for g in groups)
    for n, group in enumerate(groups):
        if seen[group.name] > 1:
            extra = next((k for k in keywords[n] if k not in group.name), str(n + 1))
            group.name = slug(f"{group.name} {extra}") or f"label_{n + 1}"
    for n, group in enumerate(groups):  # still equal after the keywords: number them
        if sum(g.name == group.name for g in groups) > 1:
            group.name = f"{group.name}_{n + 1}"


def _taxonomy(groups: list[_Group], options: InductionOptions, base: Taxonomy | None) -> Taxonomy:
    """The induced taxonomy (base labels first when extending one); validated like any file."""
    labels = [label.model_dump(exclude_defaults=True) for label in (base.labels if base else [])]
    labels += [{"name": g.name, "description": g.description, "examples": g.examples} for g in groups]
    settings = base.model_dump(exclude={"name", "version", "labels"}, exclude_defaults=True) if base else {
        "description": f"Labels induced from a corpus ({len(labels)} labels).",
        "instruction": "Choose the label that best describes the text.",
        "abstention": {"allow_none": options.allow_none}}
    data = {"name": options.name, "version": "1", **settings, "labels": labels}
    return parse_taxonomy(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), source="<induced>")


def _yaml(taxonomy: Taxonomy, options: InductionOptions, source: str, engine: EngineInfo, encoder: str,
          report: dict) -> str:
    """The taxonomy as YAML with a header recording where it came from and how."""
    header = [
        f"# Induced by annotate on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {source}",
        f"# corpus: {report['corpus_size']} documents; sample: {report['sample_size']} (seed {options.seed})",
        f"# model: {engine.model} ({engine.engine}); embeddings: {encoder}; method: {options.method}",
        f"# settings: max_labels={options.max_labels} merge_similarity={options.merge_similarity} "
        f"min_share={options.min_share}",
        f"# review on {report['report_size']} documents: coverage {report['coverage']:.0%}"
        + ("" if report["outlier_share"] is None else
           f"; other (far from every label): {report['outlier_share']:.0%} of the sample")
        + ("" if report["none_share"] is None else f"; none-of-these {report['none_share']:.0%}"),
        "# Edit freely: names, descriptions and examples are suggestions.",
    ]
    if report.get("proposed_additions"):
        header.append(f"# proposed additions: {', '.join(report['proposed_additions'])}")
    for pair in report.get("proposed_merges", []):
        header.append(f"# proposed merge: {pair['a']} + {pair['b']} (confused on {pair['share']:.0%})")
    body = yaml.safe_dump(taxonomy.model_dump(exclude_defaults=True), sort_keys=False, allow_unicode=True, width=100)
    return "\n".join(header) + "\n" + body
