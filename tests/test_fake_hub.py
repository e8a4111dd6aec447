"""The fake hub works with the real huggingface_hub client: downloads, metadata, resume, and the fault hooks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants, file_download, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub import model_info as module_level_model_info
from huggingface_hub import snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils.sha import git_hash

from fake_hub import HF_GET_ATTEMPTS, FakeHub

REPO_ID = "argilla/notus-7b-v1"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHARD = "model-00001-of-00001.safetensors"
WANTED = ["*.safetensors", "config.json", "tokenizer_config.json"]


@pytest.fixture
def repo_dir(tmp_path) -> Path:
    d = tmp_path / "repo"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 8}))
    (d / "tokenizer_config.json").write_text(json.dumps({"legacy": True}))
    (d / "pytorch_model.bin").write_bytes(b"not wanted")  # allow_patterns must leave it behind
    (d / SHARD).write_bytes(os.urandom(3 * 1024 * 1024))
    return d


@pytest.fixture
def hub(repo_dir, tmp_path, monkeypatch):
    with FakeHub(REPO_ID, repo_dir, commit=COMMIT) as hub:
        hub.patch_client(monkeypatch, tmp_path / "hf-cache")
        yield hub


@pytest.fixture
def fast_retries(monkeypatch):
    """http_get sleeps 1 s before each of its resumes; file_download uses `time` for nothing else."""
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda seconds: None))


def small_chunks(monkeypatch) -> int:
    # http_get hands bytes to the file in DOWNLOAD_CHUNK_SIZE (10 MiB) pieces; what is buffered short of a
    # piece is lost when the connection drops. Smaller pieces let a 3 MB file be resumed mid-way.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    return 64 * 1024


def test_snapshot_download_with_allow_patterns_is_byte_identical(hub, repo_dir, tmp_path):
    out = tmp_path / "weights"
    path = snapshot_download(repo_id=REPO_ID, revision="main", local_dir=str(out), allow_patterns=WANTED)

    assert Path(path) == out.resolve()
    wanted = ["config.json", "tokenizer_config.json", SHARD]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(wanted)
    for name in wanted:
        assert (out / name).read_bytes() == (repo_dir / name).read_bytes()
    # "main" was resolved once, then every file was fetched at the commit.
    assert ("GET", f"/api/models/{REPO_ID}/revision/main", None) in hub.requests
    assert hub.gets(SHARD) == [None]
    assert all(COMMIT in p for m, p, _ in hub.requests if "/resolve/" in p)
    # The client's own checker agrees with the tree's hashes (git sha1 for git files, sha256 for LFS ones).
    verification = HfApi().verify_repo_checksums(REPO_ID, revision=COMMIT, local_dir=out)
    assert verification.mismatches == [] and verification.checked_count == 3


def test_model_info_and_file_metadata_report_sizes_and_hashes(hub, repo_dir):
    shard = (repo_dir / SHARD).read_bytes()
    config = (repo_dir / "config.json").read_bytes()

    info = HfApi().model_info(REPO_ID, revision="main", files_metadata=True)
    assert info.sha == COMMIT
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {"config.json", "tokenizer_config.json", "pytorch_model.bin", SHARD}
    assert siblings[SHARD].size == len(shard)
    assert siblings[SHARD].lfs.sha256 == hashlib.sha256(shard).hexdigest()
    assert siblings[SHARD].lfs.size == len(shard) and siblings[SHARD].lfs.pointer_size > 0
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].size == len(config) and siblings["config.json"].blob_id == git_hash(config)
    assert module_level_model_info(REPO_ID).sha == COMMIT  # the module-level HfApi was re-pointed too

    # What hf_hub_download learns from its HEAD request.
    meta = get_hf_file_metadata(hf_hub_url(REPO_ID, SHARD, revision="main"))
    assert (meta.commit_hash, meta.etag, meta.size) == (COMMIT, hashlib.sha256(shard).hexdigest(), len(shard))
    meta = get_hf_file_metadata(hf_hub_url(REPO_ID, "config.json", revision=COMMIT))
    assert (meta.etag, meta.size) == (git_hash(config), len(config))

    paths = HfApi().get_paths_info(REPO_ID, ["config.json", SHARD, "absent.json"], revision="main")
    assert {p.path: p.size for p in paths} == {"config.json": len(config), SHARD: len(shard)}


def test_unknown_file_and_unknown_commit_raise_the_hub_errors(hub, tmp_path):
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO_ID, "absent.json", local_dir=tmp_path / "w")
    with pytest.raises(RevisionNotFoundError):
        HfApi().model_info(REPO_ID, revision="f" * 40)


def test_dropped_connection_is_resumed_with_a_range_request(hub, repo_dir, tmp_path, monkeypatch, fast_retries):
    chunk = small_chunks(monkeypatch)
    hub.interrupt_after(SHARD, 1_000_000)

    path = hf_hub_download(REPO_ID, SHARD, revision="main", local_dir=tmp_path / "w")

    assert Path(path).read_bytes() == (repo_dir / SHARD).read_bytes()
    first, resumed = hub.gets(SHARD)
    assert first is None
    # It resumed from the last whole chunk it had written, not from the start...
    assert resumed == f"bytes={1_000_000 // chunk * chunk}-" and 1_000_000 // chunk > 0
    # ...and the hub answers such a request with the tail of the file, not the whole of it.
    reply = httpx2.get(hf_hub_url(REPO_ID, SHARD, revision="main"), headers={"Range": "bytes=1000-"})
    assert reply.status_code == 206 and reply.content == (repo_dir / SHARD).read_bytes()[1000:]
    assert reply.headers["Content-Range"] == f"bytes 1000-{len(reply.content) + 999}/{len(reply.content) + 1000}"


def test_download_that_keeps_dropping_raises_and_the_next_call_starts_over(
    hub, repo_dir, tmp_path, monkeypatch, fast_retries
):
    chunk = small_chunks(monkeypatch)
    out = tmp_path / "weights"
    hub.interrupt_after(SHARD, 1_000_000, times=HF_GET_ATTEMPTS)

    with pytest.raises(httpx2.RemoteProtocolError):
        snapshot_download(repo_id=REPO_ID, revision="main", local_dir=str(out), allow_patterns=WANTED)
    resume_from = f"bytes={1_000_000 // chunk * chunk}-"
    assert hub.gets(SHARD) == [None] + [resume_from] * (HF_GET_ATTEMPTS - 1)
    assert not (out / SHARD).exists()
    # huggingface_hub 2.4.0 downloads into a uniquely named `.incomplete` file and deletes it on failure,
    # so nothing is left for a later call to resume from.
    assert list(out.rglob("*.incomplete")) == []

    snapshot_download(repo_id=REPO_ID, revision="main", local_dir=str(out), allow_patterns=WANTED)
    assert (out / SHARD).read_bytes() == (repo_dir / SHARD).read_bytes()
    assert hub.gets(SHARD)[HF_GET_ATTEMPTS:] == [None]  # a fresh GET from byte 0


def test_corrupt_hook_serves_bytes_that_do_not_match_the_metadata(hub, repo_dir, tmp_path):
    hub.serve_corrupt(SHARD)
    out = tmp_path / "weights"

    # The client checks only the size, so it accepts the bad bytes; refusing them is the product's job.
    snapshot_download(repo_id=REPO_ID, revision="main", local_dir=str(out), allow_patterns=WANTED)

    got = (out / SHARD).read_bytes()
    lfs = {s.rfilename: s for s in HfApi().model_info(REPO_ID, files_metadata=True).siblings}[SHARD].lfs
    assert len(got) == lfs.size
    assert hashlib.sha256(got).hexdigest() != lfs.sha256
    assert lfs.sha256 == hashlib.sha256((repo_dir / SHARD).read_bytes()).hexdigest()
    mismatches = HfApi().verify_repo_checksums(REPO_ID, local_dir=out).mismatches
    assert [m["path"] for m in mismatches] == [SHARD]


def test_a_child_process_reaches_the_fake_hub_through_HF_ENDPOINT(hub, repo_dir, tmp_path):
    out = tmp_path / "weights"
    code = (
        "import sys; from huggingface_hub import snapshot_download; "
        f"snapshot_download(repo_id={REPO_ID!r}, revision='main', local_dir=sys.argv[1], "
        "allow_patterns=['config.json'])"
    )
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=os.environ.copy(), timeout=60)
    assert (out / "config.json").read_bytes() == (repo_dir / "config.json").read_bytes()
    assert ("GET", f"/api/models/{REPO_ID}/revision/main", None) in hub.requests
