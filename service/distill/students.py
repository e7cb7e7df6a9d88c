"""Students: small classifiers that learn a taxonomy from the LLM's labels and serve it cheaply.

Kinds, from cheapest to strongest (``KINDS``):

- ``ngram``: logistic regression on hashed word 1–2-grams (scikit-learn only);
- ``static``: logistic regression on static embeddings: all-MiniLM-L6-v2 distilled once
  into a model2vec static model (a vector per token, averaged; no transformer at run time);
- ``minilm``: logistic regression on all-MiniLM-L6-v2 sentence embeddings;
- ``finetune``: all-MiniLM-L6-v2 fine-tuned end to end with a classification head.

The linear kinds are scikit-learn pipelines (features, then ``LogisticRegression``) saved
with joblib; the ngram one loads with scikit-learn alone. The fine-tuned encoder is a
transformers directory (``AutoModelForSequenceClassification``), loadable without us.

Targets are distributions over the classes (``Targets``): a linear head learns them
exactly by the usual weighted-expansion trick (a document appears once per class with
weight q_k, so the weighted log-loss is the cross-entropy with the soft target). A
candidate set {A, B} is learnt as "A or B": the target starts as the LLM's distribution
restricted to the set and is then re-estimated from the student's own probabilities
restricted to the set (progressive identification, as in partial-label learning), so the
student, not a coin flip, decides between A and B.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from service.files import atomic_path
from service.labelling.labeller import in_order
from service.vocabulary import StudentKind, values

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

KINDS = values(StudentKind)
STATIC_NAME = "minilm-static-256"  # the distilled static model's directory under models_dir
REFINE_ROUNDS = 2


class Predictor(Protocol):
    """A trained student as it is used: its classes, and their probabilities for texts (in that order)."""

    classes_: np.ndarray

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Class probabilities, one row per text."""
        ...


@dataclass
class Targets:
    """What a student learns: a distribution over ``classes`` per document, its candidate mask and weight."""

    classes: list[str]
    matrix: np.ndarray  # (n, K) rows summing to 1
    allowed: np.ndarray  # (n, K) bool: the labels the document may have (its candidate set, or all)
    weights: np.ndarray  # (n,)


def fetch_static_model(models_dir: Path) -> Path:
    """Distil all-MiniLM-L6-v2 into a model2vec static model once (about a minute on a CPU); return its dir."""
    target = Path(models_dir) / STATIC_NAME
    if (target / "model.safetensors").exists():
        return target
    from model2vec.distill import distill_from_model
    from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast

    from service.engines.embeddings import model_dir

    source = model_dir()
    tokenizer = cast(PreTrainedTokenizerFast, AutoTokenizer.from_pretrained(source))  # MiniLM ships tokenizer.json
    static = distill_from_model(AutoModel.from_pretrained(source), tokenizer, pca_dims=256, device="cpu")
    with atomic_path(target) as partial:  # another process may finish first
        static.save_pretrained(str(partial))
    return target


class StaticEmbedding(BaseEstimator, TransformerMixin):
    """Texts to model2vec static vectors; the model is loaded lazily and not pickled (only its path)."""

    def __init__(self, path: str):
        self.path = path

    def fit(self, texts, y=None):
        """Nothing to learn."""
        return self

    def transform(self, texts) -> np.ndarray:
        """Mean token vectors of each text."""
        if getattr(self, "_model", None) is None:
            from model2vec import StaticModel

            self._model = StaticModel.from_pretrained(self.path)
        return self._model.encode(list(texts), use_multiprocessing=False)

    def __getstate__(self):
        return {"path": self.path}


class SentenceEmbedding(BaseEstimator, TransformerMixin):
    """Texts to all-MiniLM-L6-v2 sentence vectors (the process's shared embedder)."""

    def fit(self, texts, y=None):
        """Nothing to learn."""
        return self

    def transform(self, texts) -> np.ndarray:
        """Normalised mean-pooled embeddings."""
        from service.engines.embeddings import shared_embedder

        return shared_embedder().embed(list(texts))


def features(kind: str, models_dir: Path):
    """The feature step of a linear student."""
    if kind == "ngram":
        return HashingVectorizer(ngram_range=(1, 2), n_features=2**16, alternate_sign=False, norm="l2")
    if kind == "static":
        return StaticEmbedding(str(fetch_static_model(models_dir)))
    if kind == "minilm":
        return SentenceEmbedding()
    raise ValueError(f"unknown student kind {kind!r}; choose one of {', '.join(KINDS)}")


def fit_linear(kind: str, texts: list[str], targets: Targets, *, models_dir: Path, refine: bool,
               x=None) -> Pipeline:
    """A features → logistic-regression pipeline fitted to soft targets (refined within candidate sets)."""
    step = features(kind, models_dir)
    x = step.fit_transform(texts) if x is None else x
    head = _fit_head(x, targets.matrix, targets.weights, targets.classes, kind)
    for _ in range(REFINE_ROUNDS if refine else 0):
        probs = in_order(head.predict_proba(x), list(head.classes_), targets.classes)
        head = _fit_head(x, _within(probs, targets.allowed), targets.weights, targets.classes, kind)
    return Pipeline([("features", step), ("head", head)])


def _fit_head(x, matrix: np.ndarray, weights: np.ndarray, classes: list[str], kind: str) -> LogisticRegression:
    """Logistic regression whose weighted log-loss is the cross-entropy with ``matrix`` (one row per class kept)."""
    import scipy.sparse as sp

    rows, cols = np.nonzero(matrix > 1e-6)
    stacked = x[rows] if sp.issparse(x) else np.asarray(x)[rows]
    head = LogisticRegression(C=10.0 if kind == "ngram" else 1.0, max_iter=500, tol=1e-3)
    return head.fit(stacked, np.array(classes, dtype=object)[cols], sample_weight=matrix[rows, cols] * weights[rows])


def _within(probs: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Probabilities restricted to each row's allowed labels and renormalised."""
    kept = np.where(allowed, probs, 0.0)
    total = kept.sum(axis=1, keepdims=True)
    return np.where(total > 0, kept / np.where(total > 0, total, 1), allowed / allowed.sum(axis=1, keepdims=True))


class FineTunedEncoder:
    """all-MiniLM-L6-v2 with a classification head, fine-tuned on soft targets (bf16 autocast on the CPU).

    The loop is written here: transformers' Trainer would need a custom ``compute_loss`` for
    weighted soft targets and brings an output directory, logging and checkpoint machinery a
    two-epoch CPU run does not need; what remains is fifteen lines of AdamW.
    """

    def __init__(self, classes: list[str], *, epochs: int = 2, batch_size: int = 16, lr: float = 5e-5,
                 max_length: int = 128, seed: int = 0, path: Path | None = None):
        self.classes_ = np.array(classes, dtype=object)
        self.epochs, self.batch_size, self.lr, self.max_length, self.seed = epochs, batch_size, lr, max_length, seed
        self.path = path
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None

    def fit(self, texts: list[str], targets: Targets) -> FineTunedEncoder:
        """A few epochs of AdamW on the cross-entropy with the soft targets."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from service.engines.embeddings import model_dir

        torch.manual_seed(self.seed)
        labels = {i: name for i, name in enumerate(self.classes_)}
        tokenizer = self.tokenizer = AutoTokenizer.from_pretrained(model_dir())
        model = self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir(), num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()})
        optimiser = torch.optim.AdamW(model.parameters(), lr=self.lr)
        q = torch.tensor(targets.matrix, dtype=torch.float32)
        w = torch.tensor(targets.weights, dtype=torch.float32)
        rng = np.random.default_rng(self.seed)
        model.train()
        for _ in range(self.epochs):
            order = rng.permutation(len(texts))
            for start in range(0, len(texts), self.batch_size):
                index = order[start:start + self.batch_size].tolist()
                tokens = tokenizer([texts[i] for i in index], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(**tokens).logits.float()
                loss = -(q[index] * torch.log_softmax(logits, dim=-1)).sum(-1).mul(w[index]).sum() / w[index].sum()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        model.eval()
        return self

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, in ``classes_`` order."""
        import torch

        model, tokenizer = self._loaded()
        out = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            for start in range(0, len(texts), batch_size):
                tokens = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
                out.append(torch.softmax(model(**tokens).logits.float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes_)))

    def save(self, path: Path) -> None:
        """A transformers directory anyone can load with AutoModelForSequenceClassification."""
        model, tokenizer = self._loaded()
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    def _loaded(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model and its tokenizer: fitted, or loaded from ``path`` when built by ``load_student``."""
        if self.model is None or self.tokenizer is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            if self.path is None:
                raise ValueError("the encoder is neither fitted nor loaded from a directory")
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModelForSequenceClassification.from_pretrained(self.path).eval()
        return self.model, self.tokenizer


def save_student(student, path: Path, meta: dict) -> int:
    """Write a student and its meta.json into a new directory; returns its size on disk in bytes."""
    import joblib

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:
        partial.mkdir()
        if isinstance(student, FineTunedEncoder):
            student.save(partial / "model")
        else:
            joblib.dump(student, partial / "model.joblib")
        (partial / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load_student(path: Path) -> Predictor:
    """A saved student: something with ``predict_proba(texts)`` and ``classes_``."""
    meta = json.loads((path / "meta.json").read_text())
    if meta["kind"] == "finetune":
        return FineTunedEncoder(meta["classes"], path=path / "model", max_length=meta.get("max_length", 128))
    import joblib

    # students saved before the package moved pickled their pipeline steps as service.students.*
    sys.modules.setdefault("service.students", sys.modules[__name__])
    return joblib.load(path / "model.joblib")
