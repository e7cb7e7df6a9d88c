"""A configured encoder (ANNOTATE_EMBEDDING_MODEL_DIR) reads documents in place of MiniLM, and says so in keys.

Real checkpoints only: the packaged MiniLM, and a copy of it whose pooling config says CLS
(a different encoder as far as the service can tell: other vectors, another identity).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import wait_for_job
from pydantic import ValidationError

from service.engines.embeddings import MODEL_ID, Embedder, model_dir, shared_embedder
from service.settings import Settings


def _copy_of_minilm(path):
    """MiniLM's checkpoint at ``path``, its weights linked rather than copied."""
    shutil.copytree(model_dir(), path, ignore=shutil.ignore_patterns("model.safetensors"))
    (path / "model.safetensors").symlink_to(model_dir() / "model.safetensors")
    return path


@pytest.fixture(scope="module")
def cls_checkpoint(tmp_path_factory):
    """MiniLM's files with CLS pooling and a shorter token limit."""
    path = _copy_of_minilm(tmp_path_factory.mktemp("encoders") / "minilm-cls")
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    return path


def test_a_configured_checkpoint_pools_as_its_files_say(cls_checkpoint):
    """The CLS copy embeds with its own pooling and token limit, under its own identity; MiniLM keeps its own."""
    texts = ["where is the nearest train station?", "WINNER!! claim your prize now"]
    default, configured = Embedder(), Embedder(cls_checkpoint)
    assert (default.identity, default.pooling, default.max_tokens) == (MODEL_ID, "mean", 256)
    assert configured.identity.startswith("minilm-cls@") and (configured.pooling, configured.max_tokens) == ("cls", 128)
    mean, cls = default.embed(texts), configured.embed(texts)
    assert np.allclose(np.linalg.norm(cls, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(mean, cls, atol=1e-3)


def test_the_identity_follows_the_checkpoint_not_its_folder_name(cls_checkpoint, tmp_path):
    """The same folder name with MiniLM's own pooling is another encoder; the shortlist and demonstration parts of
    LLM annotator keys carry a configured encoder's identity, and MiniLM's keys stay as they were."""
    from service.engines.embeddings import identity
    from service.labelling.demonstrations import Demonstrator
    from service.taxonomy import Demonstrations

    same_name = _copy_of_minilm(tmp_path / cls_checkpoint.name)
    assert identity(same_name) != identity(cls_checkpoint)
    plan = Demonstrations(select="similar")
    configured = Demonstrator([], plan, lambda texts: np.zeros((len(texts), 4)), encoder=identity(cls_checkpoint))
    default = Demonstrator([], plan, lambda texts: np.zeros((len(texts), 4)))
    assert configured.spec["encoder"] == identity(cls_checkpoint) and "encoder" not in default.spec


def test_a_directory_that_is_no_checkpoint_is_refused_naming_the_setting(tmp_path):
    """Refused when the settings are read (service start), not at the first job that embeds; a checkpoint with a
    layer this embedder would skip (a Dense head) is refused when it loads, naming the layer."""
    from service.errors import EngineUnavailable

    with pytest.raises(ValidationError, match="ANNOTATE_EMBEDDING_MODEL_DIR"):
        Settings(embedding_model_dir=tmp_path)
    dense = _copy_of_minilm(tmp_path / "dense")
    modules = json.loads((dense / "modules.json").read_text())
    (dense / "modules.json").write_text(json.dumps(
        [*modules, {"idx": len(modules), "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(EngineUnavailable, match="Dense"):
        Embedder(dense)


def test_the_default_panel_reads_with_the_configured_encoder(in_process, cls_checkpoint):
    """A job's embedding annotator is keyed by the configured encoder (the runner's, as the service passes
    ANNOTATE_EMBEDDING_MODEL_DIR), and the process's shared MiniLM, which students read with, stays MiniLM."""
    in_process.runner.panels.embedding_model_dir = cls_checkpoint
    client = in_process.client
    documents = [{"id": f"d{i}", "text": text} for i, text in enumerate(
        ["see you at dinner tonight", "FREE ringtones, txt TONES to 81234", "running late, save me a seat",
         "URGENT! you have won a 1000 GBP prize, call 09061701461"] * 3)]
    answer = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": documents})
    assert answer.status_code == 202, answer.text
    job = wait_for_job(client, answer.json()["job_id"], timeout_s=120)
    assert job["status"] == "succeeded" and job["refinement"]["trained_on"] == "panel labels"
    spec = in_process.store.jobs.get(job["job_id"]).annotator_spec
    assert spec["members"][1]["model"] == shared_embedder(cls_checkpoint).identity != MODEL_ID
    assert shared_embedder().identity == MODEL_ID
