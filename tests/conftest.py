from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import sentencepiece

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "scripts"))

from cog_server import Server  # noqa: E402
from random_checkpoint import TOKENIZER_MODEL, write_tiny  # noqa: E402

from notus.engine import Engine  # noqa: E402


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("weights"))


# The device in-process tests run on: the CPU, or NOTUS_DEVICE=cuda on a GPU machine.
TEST_DEVICE = os.environ.get("NOTUS_DEVICE", "cpu")


@pytest.fixture(scope="session")
def engine(tiny_weights) -> Engine:
    return Engine.load(tiny_weights, device=TEST_DEVICE)


@pytest.fixture(scope="session")
def sp() -> sentencepiece.SentencePieceProcessor:
    """The reference: SentencePiece itself, as the legacy tokenizer used it in training."""
    return sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER_MODEL))


def failed_setup_logs(weights: Path, log_path: Path, env: dict | None = None) -> str:
    """Starts the server on `weights`, expects setup to fail, returns the setup logs."""
    server = Server(weights, log_path, wait_ready=False, env=env)
    try:
        health = server.wait_setup()
        assert health["status"] == "SETUP_FAILED", health
        assert server.predict(prompt="Hi").status_code == 503  # refuses work, stays up
        return health["setup"]["logs"]
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(tiny_weights, tmp_path_factory):
    server = Server(tiny_weights, tmp_path_factory.mktemp("server") / "server.log")
    yield server
    server.stop()
