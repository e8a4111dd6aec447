"""The real download code against a local stand-in for the hub: verified, never corrupt."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
from huggingface_hub import constants, file_download

from conftest import Server, failed_setup_logs
from fake_hub import HF_GET_ATTEMPTS, FakeHub
from notus.checkpoint import check_checkpoint
from notus.weights import MANIFEST, REPO_ID, DownloadError, download, file_digest, missing_files

COMMIT = "4d1e5c0de0000000000000000000000000000001"


@pytest.fixture
def hub(tiny_weights, tmp_path, monkeypatch):
    repo = Path(shutil.copytree(tiny_weights, tmp_path / "repo"))
    (repo / "pytorch_model.bin").write_bytes(b"a duplicate format the download must skip")
    with FakeHub(REPO_ID, repo, commit=COMMIT) as hub:
        hub.patch_client(monkeypatch, tmp_path / "hf-cache")
        yield hub


def shard_names(weights: Path) -> list[str]:
    return sorted(p.name for p in weights.glob("*.safetensors"))


def test_complete_download_is_verified_and_recorded(hub, tiny_weights, tmp_path):
    out = download(tmp_path / "weights")
    assert not (out / "pytorch_model.bin").exists()
    for name in shard_names(tiny_weights) + ["config.json", "tokenizer.model", "model.safetensors.index.json"]:
        assert (out / name).read_bytes() == (tiny_weights / name).read_bytes()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["commit"] == COMMIT and manifest["complete"]
    shard = shard_names(tiny_weights)[0]
    assert manifest["files"][shard] == {
        "size": (tiny_weights / shard).stat().st_size,
        "sha256": file_digest(tiny_weights / shard, lfs=True),
    }
    assert manifest["files"]["config.json"]["git_sha1"] == hub.files["config.json"].blob_id
    check_checkpoint(out)


def test_a_file_whose_bytes_differ_from_the_hash_is_refused(hub, tiny_weights, tmp_path):
    shard = shard_names(tiny_weights)[1]
    hub.serve_corrupt(shard)
    with pytest.raises(DownloadError) as error:
        download(tmp_path / "weights")
    assert shard in str(error.value) and "sha256" in str(error.value)
    assert not (tmp_path / "weights" / shard).exists()  # deleted, never left to be loaded
    assert not json.loads((tmp_path / "weights" / MANIFEST).read_text())["complete"]
    hub.serve_corrupt(shard, False)
    download(tmp_path / "weights")  # a re-run fetches it again and completes
    assert (tmp_path / "weights" / shard).read_bytes() == (tiny_weights / shard).read_bytes()


def test_an_interrupted_transfer_resumes_where_it_stopped(hub, tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    shard = shard_names(tiny_weights)[0]
    hub.interrupt_after(shard, 3 * 1024 * 1024, times=HF_GET_ATTEMPTS - 1)
    download(tmp_path / "weights")
    ranges = hub.gets(shard)
    assert ranges[0] is None and all(r and r.startswith("bytes=") and r != "bytes=0-" for r in ranges[1:])
    assert (tmp_path / "weights" / shard).read_bytes() == (tiny_weights / shard).read_bytes()


def test_a_run_killed_mid_file_is_resumed_by_the_next_run(hub, tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    first, second = shard_names(tiny_weights)[:2]
    cut = 3 * 1024 * 1024
    hub.interrupt_after(second, cut, times=HF_GET_ATTEMPTS)  # more drops than one run absorbs
    with pytest.raises(DownloadError) as error:
        download(tmp_path / "weights")
    assert second in str(error.value) and "again to resume" in str(error.value)
    assert not (tmp_path / "weights" / second).exists()  # nothing half-written under the real name
    gets_before = {name: len(hub.gets(name)) for name in (first, second)}

    download(tmp_path / "weights")
    resumed = hub.gets(second)[gets_before[second]:]
    assert resumed == [f"bytes={cut}-"]  # one GET, from where the killed run stopped
    assert len(hub.gets(first)) == gets_before[first]  # a file verified earlier is not fetched again
    assert (tmp_path / "weights" / second).read_bytes() == (tiny_weights / second).read_bytes()
    assert json.loads((tmp_path / "weights" / MANIFEST).read_text())["complete"]
    assert not list((tmp_path / "weights" / ".cache" / "notus").glob("*.partial"))


def test_weights_of_an_interrupted_download_count_as_missing(hub, tiny_weights, tmp_path):
    out = download(tmp_path / "weights")
    assert missing_files(out) == []
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps(manifest | {"complete": False}))
    assert any("interrupted download" in m for m in missing_files(out))  # so setup downloads the rest


def test_an_unreadable_index_counts_as_missing_and_is_fetched_again(hub, tiny_weights, tmp_path):
    out = download(tmp_path / "weights")
    (out / "model.safetensors.index.json").write_text("{ not json")
    assert missing_files(out) == ["model.safetensors.index.json (unreadable)"]
    download(out)
    assert missing_files(out) == []
    check_checkpoint(out)


def test_setup_downloads_missing_weights_then_serves(hub, tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    server = Server(empty, tmp_path / "server.log")
    try:
        logs = server.health()["setup"]["logs"]
        assert "downloading" in logs and COMMIT in logs
        assert (empty / MANIFEST).exists()
        assert server.predict(prompt="Hi", max_tokens=3).json()["status"] == "succeeded"
    finally:
        server.stop()


def test_setup_without_network_says_what_to_run_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    empty = tmp_path / "weights"
    empty.mkdir()
    logs = failed_setup_logs(empty, tmp_path / "server.log")
    assert f"python scripts/download_weights.py --dir {empty}" in logs and "could not be downloaded" in logs
