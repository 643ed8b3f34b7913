"""Shared test set-up: offline, quiet, and nothing written outside tmp directories."""

import os
import tempfile

_home = tempfile.mkdtemp(prefix="saev-tests-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["SAEV_CACHE_DIR"] = os.path.join(_home, "cache")
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = os.path.join(_home, "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{os.path.join(_home, 'mlflow.db')}"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from headless import chromium_browser, chromium_tab  # noqa: E402,F401  (Playwright fixtures)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every test that runs a flow with the engine."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A 32 px shapes world of 24 images (train 12 / val 6 / test 6)."""
    from saev_core.shapes import ShapesConfig, generate

    out = tmp_path_factory.mktemp("world") / "shapes"
    cfg = ShapesConfig(
        seed=3, image_size=32, n_train=12, n_val=6, n_test=6, min_radius=5, max_radius=9
    )
    generate(out, cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    """A randomly initialised 2-block ViT classifier over the 8 concepts, saved like a hub model."""
    from saev_core.demo_vit import BackboneConfig, build_classifier, build_processor

    cfg = BackboneConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=32,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("vit") / "vit"
    build_classifier(cfg).save_pretrained(out)
    build_processor(32).save_pretrained(out)
    return out


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """A moto S3 server on loopback with an empty bucket `saev`, for one test (tests/servers.py).

    The test's environment gets the fake credentials and `AWS_ENDPOINT_URL`, so boto3, s3fs,
    dvc-s3 and MLflow in this process and in its children reach it. Stopped by its PID at the
    end; its log's tail is printed at teardown, which pytest shows when the test fails."""
    from servers import MotoServer

    server = MotoServer(tmp_path / "moto")
    try:
        server.start()
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        yield server
    finally:
        server.stop()
        print(f"moto server log {server.home / 'moto-server.log'}:\n{server.tail()}")
