"""Shared fixtures: one local Ray per session and a real S3 API server (moto) on 127.0.0.1.

Nothing here fakes the code under test: s3fs and pyarrow talk HTTP to the moto server,
and pipelines run on a real local Ray.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

# Credentials and region for every client in this process and in Ray workers started from
# it (they inherit the environment). Distinctive values so leak checks can grep for them.
TEST_KEY = "AKIAMMCURATETESTKEY01"
TEST_SECRET = "mmcurate-test-secret-do-not-log"
os.environ["AWS_ACCESS_KEY_ID"] = TEST_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = TEST_SECRET
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 object_store_memory=512 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield endpoint
    server.stop()


@pytest.fixture()
def s3(s3_server, request):
    """Fresh buckets for one test: returns (s3fs filesystem, storage_options, bucket prefix)."""
    import boto3
    import s3fs

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    opts = {"endpoint_url": s3_server, "key": TEST_KEY, "secret": TEST_SECRET}
    fs = s3fs.S3FileSystem(**{k: v for k, v in opts.items() if k != "endpoint_url"},
                           client_kwargs={"endpoint_url": s3_server})
    yield fs, opts, name
    fs.invalidate_cache()


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests on machines without CUDA (this one, CI)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
