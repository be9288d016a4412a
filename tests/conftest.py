"""Shared fixtures: one local Ray per session, a real S3 API server (moto) on 127.0.0.1, tiny models.

Nothing here fakes the code under test: s3fs and pyarrow talk HTTP to the moto server,
pipelines run on a real local Ray, and model operators load real (tiny, random) transformers
models built once per session.

The environment the suite needs (test credentials, HF offline, a private model staging
cache, an HF home under a temporary folder, a temporary folder for Ray's session folders and
one for the temporary files of every process the tests start) is set in ``pytest_configure``
-- before test modules are imported, because huggingface_hub reads its settings at import --
and restored in ``pytest_unconfigure``. A session guard fails the run if anything new appears
in HOME.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

# Credentials and region for every client in this process and in Ray workers started from
# it (they inherit the environment). Distinctive values so leak checks can grep for them.
TEST_KEY = "AKIAMMCURATETESTKEY01"
TEST_SECRET = "mmcurate-test-secret-do-not-log"

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Where the suite's own state goes for the whole run (model staging cache, HF home); made in
# pytest_configure, removed in pytest_unconfigure.
_SESSION: dict = {}


def _home_entries() -> set[str]:
    """What the suite must not add to: HOME's top level and everything under ~/.cache (2 levels)."""
    home = Path.home()
    out: set[str] = set()
    if home.is_dir():
        out |= {p.name for p in home.iterdir()}
    cache = home / ".cache"
    if cache.is_dir():
        for p in cache.iterdir():
            out.add(f".cache/{p.name}")
            if p.is_dir():
                try:
                    out |= {f".cache/{p.name}/{q.name}" for q in p.iterdir()}
                except OSError:
                    pass
    return out


# What processes leave in /tmp when they run outside the suite's folders or are killed before they
# clean up: multiprocessing's folders, torch's cache folder, Ray's session folders. The session
# guard fails the run if one appears (/tmp, where they land when TMPDIR is unset, as in CI).
SYSTEM_TMP = Path("/tmp")
TMP_LEFTOVERS = ("pymp-*", "torchinductor_*", "ray/session_2*")


def _tmp_leftovers() -> set[str]:
    return {str(p.relative_to(SYSTEM_TMP)) for pattern in TMP_LEFTOVERS for p in SYSTEM_TMP.glob(pattern)}


def _keep_file_order(config) -> None:
    """xdist hands out files in collection order (``--no-loadscope-reorder``) unless the
    command line asks for its reordering (``--loadscope-reorder``)."""
    if hasattr(config.option, "loadscopereorder") and "--loadscope-reorder" not in config.invocation_params.args:
        config.option.loadscopereorder = False


def pytest_configure(config):
    """Set the suite's environment before any test module is imported; remember how to undo it."""
    _keep_file_order(config)
    root = Path(tempfile.mkdtemp(prefix="mmcurate-tests-"))
    # Every Ray the tests start (the session's, a subprocess run's own) keeps its session folder
    # (logs, sockets, spilled objects) here instead of /tmp/ray, where they would stay after the
    # suite. A short folder directly under /tmp: Ray's unix socket paths must stay under 108 bytes,
    # which a long TMPDIR would break.
    ray_tmp = Path(tempfile.mkdtemp(prefix="mmr-", dir="/tmp"))
    # Every process the tests start (Ray's workers and dashboards, subprocess runs, browsers)
    # makes its temporary files here: a process killed before it cleans up (a `ray start` node's
    # dashboard leaves Python's multiprocessing folder, pymp-*) then leaves nothing in /tmp.
    # This process keeps the folder tempfile chose above (it caches it at first use), so pytest's
    # tmp_path stays where pytest puts it.
    proc_tmp = ray_tmp / "tmp"
    proc_tmp.mkdir()
    mp = pytest.MonkeyPatch()
    env = {
        "AWS_ACCESS_KEY_ID": TEST_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        # Staged object-storage models and anything the HF libraries cache go under root,
        # never to ~/.cache (operators.models.loading.cache_root, huggingface_hub, datasets).
        "MMCURATE_MODEL_CACHE": str(root / "model-cache"),
        "HF_HOME": str(root / "hf-home"),
        # Browsers and other tools the tests start keep their caches and settings here too.
        "XDG_CACHE_HOME": str(root / "xdg-cache"),
        "XDG_CONFIG_HOME": str(root / "xdg-config"),
        # CUDA's JIT compute cache (~/.nv by default) on GPU machines.
        "CUDA_CACHE_PATH": str(root / "cuda-cache"),
        # torch makes its inductor cache folder (TMPDIR/torchinductor_USER) when transformers
        # is imported, here too: this process's TMPDIR is still /tmp (see proc_tmp above).
        "TORCHINDUCTOR_CACHE_DIR": str(root / "torchinductor"),
        # ray.init() without an address joins any cluster `ray start` left on this machine;
        # "local" makes every Ray the tests (and their subprocess runs) start a private one.
        "RAY_ADDRESS": "local",
        # Token auth (Ray's default for a new local Ray) writes ~/.ray/auth_token; the tests'
        # private Rays need none. Tests of `ray start` clusters set RAY_AUTH_MODE themselves.
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": str(ray_tmp),
        "TMPDIR": str(proc_tmp),
    }
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "HF_ENDPOINT", "HF_HUB_CACHE"):
        mp.delenv(name, raising=False)  # a developer's own settings must not leak into the tests
    browsers = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ms-playwright"
    if browsers.is_dir() and "PLAYWRIGHT_BROWSERS_PATH" not in os.environ:
        env["PLAYWRIGHT_BROWSERS_PATH"] = str(browsers)  # installed browsers stay findable
    for name, value in env.items():
        mp.setenv(name, value)
    _SESSION.update(root=root, ray_tmp=ray_tmp, monkeypatch=mp, home_before=_home_entries(),
                    tmp_before=_tmp_leftovers())


def pytest_unconfigure(config):
    mp = _SESSION.pop("monkeypatch", None)
    if mp is not None:
        mp.undo()
    for name in ("root", "ray_tmp"):
        folder = _SESSION.pop(name, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_outside_tmp():
    """Fail the session if the tests added anything to HOME or ~/.cache, or left one of
    TMP_LEFTOVERS in /tmp (they must use their temporary folders)."""
    yield
    added = _home_entries() - _SESSION.get("home_before", set())
    if added:
        pytest.fail(f"the tests wrote outside their temporary folders: {sorted(added)}", pytrace=False)
    left = _tmp_leftovers() - _SESSION.get("tmp_before", set())
    if left:
        pytest.fail(f"the tests left these in {SYSTEM_TMP}: {sorted(left)}", pytrace=False)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    """The suite's private temporary folder (holds the model staging cache and HF home)."""
    return _SESSION["root"]


# Tries to start the session's Ray (see ray_session).
RAY_START_ATTEMPTS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray for the whole session.

    It is started with ``tests.helpers.TEST_RAY``, the ``ray`` section every in-process test
    config carries, so no test config asks for settings this shared Ray silently ignores, and
    with the system settings of the Ray a run starts for itself (``LOCAL_RAY_SYSTEM_CONFIG``).
    """
    import logging

    import ray

    from pipelines.runner import LOCAL_RAY_SYSTEM_CONFIG
    from tests.helpers import TEST_RAY

    # Ray gives a new node a fixed 30 s to register; a machine shared by many jobs can miss
    # that window, so the session tries a few times before giving up.
    for attempt in range(RAY_START_ATTEMPTS):
        if ray.is_initialized():
            break
        try:
            ray.init(address="local", num_cpus=TEST_RAY["num_cpus"], include_dashboard=False,
                     object_store_memory=TEST_RAY["object_store_memory_mb"] * 1024 * 1024,
                     logging_level=logging.WARNING, _system_config=dict(LOCAL_RAY_SYSTEM_CONFIG))
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception on a startup timeout
            if "timed out during startup" not in str(exc) or attempt == RAY_START_ATTEMPTS - 1:
                raise
            ray.shutdown()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def session_ray_address(ray_session) -> str:
    """The session Ray's address. A subprocess run given it as ``RAY_ADDRESS`` joins it as a driver
    on a cluster's head does, instead of starting (and stopping) a Ray of its own (~15 s each)."""
    return ray_session.get_runtime_context().gcs_address


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


class TinyModels:
    """Tiny random models built on first use, once per session, under one temporary folder.

    ``tiny_models["clip"]`` is the local path of the tiny CLIP (see ``jobs.tiny_models``).
    Tests must not modify these folders; copy one first (``shutil.copytree``) to damage it.
    """

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        if name not in self._built:
            from jobs.tiny_models import BUILDERS

            self._built[name] = str(BUILDERS[name](self.root / name))
        return self._built[name]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """Every tiny model the suite uses, each built once per session (they cost seconds each)."""
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


def pytest_collection_modifyitems(config, items):
    """Longest files first; skip `gpu`-marked tests on machines without CUDA (this one, CI).

    With ``-n 2 --dist loadfile`` each worker takes the next file when it is done, in this
    order (:func:`_keep_file_order`: xdist would otherwise put the files with the most tests
    first, which left the end-to-end files, a minute or two each, for last and one worker idle
    while the other finished them). Files with `slow` tests go first, then
    the other integration files, then the unit tests, which fill in at the end.
    """
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: 0 if item.path in slow_files else 1 if "integration" in item.path.parts else 2)
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
