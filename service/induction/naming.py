"""Words for label groups: c-TF-IDF keywords, slugs, spoken names and short snippets of their texts."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from service.taxonomy import NONE_LABEL

SNIPPET_CHARS = 160


_SLUG = re.compile(r"[^a-z0-9]+")


WORD = re.compile(r"[a-z][a-z0-9']+")


STOP_WORDS = frozenset("""a about also an and are as at be been but by can could did do does done for from get got had has
have he her his how i if in into is it its many me more most much my no not of on one or other our she so some such
than that the their them then there these they this those to two us was we were what when where which who whom whose
why will with would you your""".split())


def ctfidf_keywords(groups: list[list[str]], top: int = 6) -> list[list[str]]:
    """c-TF-IDF: per group, the words frequent in it and rare in the others."""
    counts = [Counter(w for t in texts for w in WORD.findall(t.lower()) if w not in STOP_WORDS) for texts in groups]
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    mean_words = sum(total.values()) / max(len(groups), 1)
    keywords = []
    for c in counts:
        size = max(sum(c.values()), 1)
        score = {w: (n / size) * np.log(1 + mean_words / total[w]) for w, n in c.items()}
        keywords.append(sorted(score, key=score.__getitem__, reverse=True)[:top])
    return keywords


def slug(text: str) -> str:
    """A valid label name from free text: lowercase words joined by '_', at most 4 words."""
    words = [w for w in _SLUG.split(text.lower()) if w][:4]
    name = "_".join(words)[:64].strip("_")
    return "" if name == NONE_LABEL else name


def spoken(name: str, description: str) -> str:
    """A label as text to embed: its name in words, then its description."""
    return f"{name.replace('_', ' ')}: {description}"


def first_sentence(text: str) -> str:
    """The first sentence of a model's description (small models ramble on)."""
    text = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text).strip()


def snippets(texts: list[str]) -> list[str]:
    """Example snippets for the YAML: one line each, shortened."""
    return [" ".join(t.split())[:SNIPPET_CHARS] for t in texts]
