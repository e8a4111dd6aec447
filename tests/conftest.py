from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import sentencepiece

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "scripts"))

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


class Server:
    """The real Cog HTTP server, started by scripts/serve as a user would.

    `command` and `cwd` start another predictor instead (the server reads `.cog/` in `cwd`).
    """

    def __init__(self, weights: Path | None, log_path: Path, wait_ready: bool = True, env: dict | None = None,
                 command: list[str] | None = None, cwd: Path = REPO):
        env = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", "PYTHON": sys.executable, **(env or {})}
        if weights is not None:
            env["COG_WEIGHTS"] = str(weights)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            command or [str(REPO / "scripts" / "serve")], cwd=cwd, env=env, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self._wait_for_port()}"
        if wait_ready:
            self.wait_ready()

    def _wait_for_port(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"Starting coglet server on [\d.]+:(\d+)", self.log_path.read_text())
            if match:
                return int(match.group(1))
            assert self.process.poll() is None, self.log_path.read_text()
            time.sleep(0.2)
        raise TimeoutError(self.log_path.read_text())

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=5).json()

    def wait_setup(self, timeout: float = 120) -> dict:
        """Health once setup has ended, in success or failure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if health["status"] != "STARTING":
                return health
            time.sleep(0.2)
        raise TimeoutError(self.health())

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.wait_setup(timeout)
            if health["status"] == "READY":
                return health
            assert health["status"] == "BUSY", health
            time.sleep(0.1)
        raise TimeoutError(self.health())

    def predict(self, timeout: float = 120, headers: dict | None = None, **inputs) -> requests.Response:
        """POST /predictions, retrying the brief 409 while the previous slot is being freed."""
        deadline = time.monotonic() + 10
        while True:
            response = requests.post(
                f"{self.url}/predictions", json={"input": inputs}, headers=headers, timeout=timeout
            )
            if response.status_code != 409 or time.monotonic() > deadline:
                return response
            time.sleep(0.1)

    def worker_pid(self) -> int:
        """The worker process that runs the predictor (a child of the server)."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                return int(stat.parent.name)
        raise LookupError("no worker process")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


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
