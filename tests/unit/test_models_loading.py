"""Model references: staging object-storage prefixes once, provenance without fetching, prefetch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from jobs.tiny_models import build_head
from operators.models import loading
from operators.models.clip import ClipConfig, ClipEmbedder
from tests.helpers import RecordingHub, install_in_hub_cache, layout_hub_cache
from tests.unit.test_models_clip import make_batch

REPO = Path(__file__).resolve().parents[2]

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models


@pytest.fixture()
def recording_hub():
    hub = RecordingHub()
    yield hub
    hub.stop()


def python(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run Python in a fresh process (huggingface_hub reads HF_* once, at import)."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **env})


@pytest.fixture()
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCURATE_MODEL_CACHE", str(tmp_path / "node-cache"))
    loading._provenance_cached.cache_clear()
    return tmp_path / "node-cache"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, tiny):
    """A local HF hub cache holding 'tiny-org/tiny-clip' at COMMIT (the layout huggingface_hub writes)."""
    root = tmp_path / "hf-hub"
    install_in_hub_cache(root, {"tiny-org/tiny-clip": tiny["clip"]}, COMMIT, monkeypatch)
    return root


def put_tree(src: str, url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    for f in Path(src).iterdir():
        fs.put_file(str(f), f"{path}/{f.name}")


def test_reference_kinds():
    assert loading.kind_of("openai/clip-vit-base-patch32") == "hub"
    assert loading.kind_of("s3://bucket/models/clip") == "remote"
    assert loading.kind_of("/abs/path") == "local" and loading.kind_of("file:///x") == "local"


def test_object_storage_model_is_staged_once_per_node_and_loads(tiny, model_cache):
    url = "memory://models-once/clip"
    put_tree(tiny["clip"], url)
    local = loading.stage(url)
    assert local.parent == model_cache and (local / "model.safetensors").read_bytes() == \
        Path(tiny["clip"], "model.safetensors").read_bytes()
    fs, path = fsspec.core.url_to_fs(url)
    fs.rm(path, recursive=True)  # a second actor on the node must not need the source again
    assert loading.stage(url) == local
    out = ClipEmbedder(ClipConfig(model=url))(make_batch(2))
    assert out["clip_image_embedding"].null_count == 0


def test_a_new_prefetch_to_the_same_url_is_staged_again(tiny, model_cache):
    url = "memory://models-again/clip"
    put_tree(tiny["clip"], url)
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe(f"{path}/{loading.MANIFEST}", json.dumps({"files": {"model.safetensors": "a"}}).encode())
    first = loading.stage(url)
    fs.pipe(f"{path}/{loading.MANIFEST}", json.dumps({"files": {"model.safetensors": "b"}}).encode())
    assert loading.stage(url) != first


PROVENANCE = """
import json, sys
from operators.models.loading import model_provenance
print(json.dumps([model_provenance("tiny-org/tiny-clip"), model_provenance("tiny-org/not-cached", "v2")]))
"""


def test_hub_id_provenance_comes_from_the_local_cache_only(tmp_path, tiny, recording_hub):
    """Online, with a hub that records every request: digests come from the cache, nothing is fetched."""
    layout_hub_cache(tmp_path / "hf-hub", {"tiny-org/tiny-clip": tiny["clip"]}, COMMIT)
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": recording_hub.url, "HF_HUB_CACHE": str(tmp_path / "hf-hub")}
    proc = python(PROVENANCE, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec, missing = json.loads(proc.stdout.strip().splitlines()[-1])
    digest = hashlib.sha256(Path(tiny["clip"], "model.safetensors").read_bytes()).hexdigest()
    assert rec["weights_sha256"] == {"model.safetensors": digest} and rec["commit"] == COMMIT
    assert missing["weights_sha256"] is None and missing["revision"] == "v2"
    assert recording_hub.requests == []
    # The same settings do reach the hub when something fetches (so the check above can fail).
    fetch = python("from huggingface_hub import snapshot_download as s; s('tiny-org/not-cached')", env)
    assert fetch.returncode != 0 and recording_hub.requests


def test_prefetch_copies_models_and_heads_with_a_manifest_and_rewrites_the_config(tmp_path, hub_cache, model_cache,
                                                                                   tiny):
    head = build_head(tmp_path / "aes.safetensors", [16, 1024, 128, 64, 16, 1])
    cfg = {"name": "m", "input": {"format": "webdataset", "paths": ["x/*.tar"]}, "output": {"path": "out"},
           "operators": [{"decode": {}}, {"clip": {"model": "tiny-org/tiny-clip"}},
                         {"aesthetic": {"weights": str(head)}}]}
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    dest = tmp_path / "models"
    res = CliRunner().invoke(app, ["models", "prefetch", str(cfg_path), "--to", str(dest),
                                   "--write-config", str(tmp_path / "p2.yaml")])
    assert res.exit_code == 0, res.output
    assert "--set operators.1.clip.model=" in res.output and "(random weights)" in res.output
    man = json.loads((dest / "tiny-org--tiny-clip" / loading.MANIFEST).read_text())
    assert man["commit"] == COMMIT and man["model"] == "tiny-org/tiny-clip" and man["random_weights"] is True
    assert man["files"]["model.safetensors"] == loading.sha256_file(Path(tiny["clip"], "model.safetensors"))
    assert (dest / "aes.safetensors").exists()
    new = yaml.safe_load((tmp_path / "p2.yaml").read_text())
    assert new["operators"][1]["clip"]["model"] == str(dest / "tiny-org--tiny-clip")
    assert new["operators"][2]["aesthetic"]["weights"] == str(dest / "aes.safetensors")
    # the copy loads with no hub at all
    out = ClipEmbedder(ClipConfig(model=new["operators"][1]["clip"]["model"]))(make_batch(2))
    assert out["clip_score"].null_count == 0


@pytest.mark.parametrize("offline", [True, False])
def test_prefetch_of_an_uncached_hub_model_is_one_clear_line_and_exit_2(tmp_path, recording_hub, offline):
    cfg = {"name": "m", "input": {"format": "webdataset", "paths": ["x/*.tar"]}, "output": {"path": "out"},
           "operators": [{"clip": {"model": "tiny-org/absent"}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    env = {"HF_HUB_OFFLINE": "1" if offline else "0", "HF_ENDPOINT": recording_hub.url,
           "HF_HUB_CACHE": str(tmp_path / "hf-hub")}
    proc = python("from jobs.cli import main; main()", env, "models", "prefetch", str(tmp_path / "p.yaml"),
                  "--to", str(tmp_path / "m"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("mmcurate: error: cannot fetch tiny-org/absent@main from the hub")
    assert bool(recording_hub.requests) is not offline  # online it asked the hub, offline it did not


def test_a_missing_local_model_path_is_a_config_error_in_the_actor_and_only_a_warning_in_provenance(tmp_path, caplog):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(loading.ConfigError, match=rf"model '{missing}': no such file or folder on "):
        loading.resolve_local(missing)
    assert loading.missing_local(missing) == missing and loading.missing_local(f"file://{missing}") == missing
    assert loading.missing_local(str(tmp_path)) is None and loading.missing_local("org/model") is None
    # A cluster's driver need not see its workers' paths: no digest, a warning, no error.
    with caplog.at_level("WARNING", logger="operators.models.loading"):
        info = loading.model_provenance(missing)
    assert info["weights_sha256"] is None and "is not on this machine" in caplog.text
