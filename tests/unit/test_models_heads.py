"""Embedding heads (aesthetic, generic) over a stored float16 embedding column (no Ray, no backbone)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from jobs.tiny_models import build_head
from operators.models.base import embedding_array
from operators.models.heads import AestheticConfig, AestheticHead, EmbeddingHead, HeadConfig
from ground.errors import ConfigError

DIM = 24


def embedding_batch(n: int = 5, nulls: tuple = (), reasons: list | None = None) -> tuple[pa.Table, np.ndarray]:
    """A batch of embeddings whose norms are far from 1 (0.5 to 8), and the vectors as stored.

    Norms that are not 1 make the head's own L2 normalisation matter: a head that skipped it
    would score these rows differently from the references below, which normalise by hand.
    """
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(n, DIM)).astype(np.float32)
    vecs *= (rng.uniform(0.5, 8.0, size=(n, 1)) / np.linalg.norm(vecs, axis=-1, keepdims=True)).astype(np.float32)
    col = embedding_array(n, {i: vecs[i] for i in range(n) if i not in nulls}, DIM)
    stored = vecs.astype(np.float16).astype(np.float32)
    return pa.table({"key": [str(i) for i in range(n)], "clip_image_embedding": col,
                     "reject_reason": pa.array(reasons or [None] * n, type=pa.string())}), stored


def unit(vecs: np.ndarray) -> torch.Tensor:
    """The reference's own L2 normalisation (numpy, not the code under test)."""
    return torch.from_numpy(vecs / np.sqrt((vecs.astype(np.float64) ** 2).sum(-1, keepdims=True)).astype(np.float32))


def laion_reference(path, dim: int) -> torch.nn.Module:
    """The improved-aesthetic-predictor module as published (ReLUs commented out there)."""

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
                torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    from safetensors.torch import load_file

    m = MLP()
    m.load_state_dict(load_file(str(path)), strict=True)
    return m.eval()


def test_aesthetic_matches_the_laion_module_on_normalised_embeddings(tmp_path):
    path = build_head(tmp_path / "aes.safetensors", [DIM, 1024, 128, 64, 16, 1])
    batch, vecs = embedding_batch()
    out = AestheticHead(AestheticConfig(weights=str(path)))(batch)
    with torch.no_grad():
        ref = laion_reference(path, DIM)(unit(vecs)).numpy()[:, 0]
        raw = laion_reference(path, DIM)(torch.from_numpy(vecs)).numpy()[:, 0]
    np.testing.assert_allclose(np.array(out["aesthetic_score"].to_pylist()), ref, rtol=2e-3, atol=2e-3)
    assert out.schema.field("aesthetic_score").type == pa.float32()
    # normalize_input: false scores the stored vectors as they are.
    unnormalised = AestheticHead(AestheticConfig(weights=str(path), normalize_input=False))(batch)
    np.testing.assert_allclose(np.array(unnormalised["aesthetic_score"].to_pylist()), raw, rtol=2e-3, atol=2e-3)


def test_rejected_rows_and_null_embeddings_score_null(tmp_path):
    path = build_head(tmp_path / "aes.safetensors", [DIM, 1024, 128, 64, 16, 1])
    batch, _ = embedding_batch(4, nulls=(2,), reasons=[None, "decode:corrupt", None, None])
    scores = AestheticHead(AestheticConfig(weights=str(path)))(batch)["aesthetic_score"].to_pylist()
    assert scores[1] is None and scores[2] is None and scores[0] is not None and scores[3] is not None


def test_aesthetic_refuses_another_layout(tmp_path):
    path = build_head(tmp_path / "lin.safetensors", [DIM, 1])
    with pytest.raises(ConfigError, match="LAION aesthetic layout"):
        AestheticHead(AestheticConfig(weights=str(path)))


def test_generic_mlp_head_with_relu_and_softmax_unit(tmp_path):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    path = tmp_path / "nsfw.safetensors"
    save_file(ref.state_dict(), str(path))
    batch, vecs = embedding_batch()
    cfg = HeadConfig(weights=str(path), output="nsfw_score", activation="relu", output_activation="softmax",
                     output_index=2)
    out = EmbeddingHead(cfg)(batch)
    with torch.no_grad():
        want = torch.softmax(ref(unit(vecs)), -1)[:, 2].numpy()
    np.testing.assert_allclose(out["nsfw_score"].to_pylist(), want, atol=2e-3)
    assert EmbeddingHead.outputs(cfg) == ("nsfw_score",)
    prov = EmbeddingHead.provenance(cfg)["nsfw_score"]
    assert prov["model"] == str(path) and len(prov["weights_sha256"]) == 1 and "random_weights" not in prov


def test_linear_head_with_sigmoid_on_another_column(tmp_path):
    lin = torch.nn.Linear(DIM, 1)
    path = tmp_path / "wm.safetensors"
    save_file({k: v.detach() for k, v in lin.state_dict().items()}, str(path))
    batch, vecs = embedding_batch()
    batch = batch.rename_columns(["key", "siglip_image_embedding", "reject_reason"])
    out = EmbeddingHead(HeadConfig(weights=str(path), output="watermark_score", embedding_column="siglip_image_embedding",
                                   output_activation="sigmoid"))(batch)
    with torch.no_grad():
        want = torch.sigmoid(lin(unit(vecs)))[:, 0].numpy()
    np.testing.assert_allclose(out["watermark_score"].to_pylist(), want, atol=2e-3)


def test_missing_column_width_mismatch_and_pickle_are_clear_errors(tmp_path):
    path = build_head(tmp_path / "aes.safetensors", [32, 1024, 128, 64, 16, 1])
    batch, _ = embedding_batch()
    op = AestheticHead(AestheticConfig(weights=str(path)))
    with pytest.raises(ConfigError, match="width 24"):
        op(batch)
    with pytest.raises(ConfigError, match="is missing"):
        op(batch.drop_columns(["clip_image_embedding"]))
    torch.save({"layers.0.weight": torch.zeros(1, 2)}, tmp_path / "h.pth")
    with pytest.raises(ConfigError, match="allow_pickle"):
        EmbeddingHead(HeadConfig(weights=str(tmp_path / "h.pth"), output="x"))
    assert EmbeddingHead(HeadConfig(weights=str(tmp_path / "h.pth"), output="x", allow_pickle=True)).layers
