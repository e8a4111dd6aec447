"""Where notus-7b-v1's weights live; fetching them from the Hugging Face hub, verified.

A download counts as complete only when every file matches the hub's recorded size and hash
(sha256 for LFS files, the git blob sha1 for small ones). What was verified is recorded in
weights/VERIFIED.json, so a boot need not hash 14.5 GB again: setup compares sizes instead.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger("notus")

REPO_ID = "argilla/notus-7b-v1"
# The hub revision the download fetches. "main" until a commit sha is pinned (see README); the
# commit actually fetched is recorded in VERIFIED.json.
REVISION = "main"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
MANIFEST = "VERIFIED.json"
# What the model needs and nothing else: no .bin duplicates of the safetensors shards.
ALLOW_PATTERNS = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
DOWNLOAD_COMMAND = "python scripts/download_weights.py"


class DownloadError(RuntimeError):
    pass


def missing_files(weights_dir: Path) -> list[str]:
    """The files a load needs that `weights_dir` lacks."""
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (weights_dir / name).is_file()]
    if not any((weights_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json (or tokenizer.model)")
    if not list(weights_dir.glob("*.safetensors")):
        missing.append("the *.safetensors weight shards")
    return missing


def require_weights(weights_dir: str | Path) -> Path:
    """`weights_dir` as a Path, or an error that says how to fetch what is missing."""
    weights_dir = Path(weights_dir)
    missing = missing_files(weights_dir)
    if missing:
        raise FileNotFoundError(
            f"notus-7b-v1 weights not found in {weights_dir}: missing {', '.join(missing)}. "
            f"Fetch them with `{DOWNLOAD_COMMAND} --dir {weights_dir}` (about 14.5 GB), or put the "
            f"files of {REPO_ID} there yourself, or point COG_WEIGHTS at a directory that holds them."
        )
    return weights_dir


def ensure_weights(weights_dir: str | Path) -> Path:
    """The weights in `weights_dir`, downloaded (verified) first if they are not there."""
    weights_dir = Path(weights_dir)
    if missing_files(weights_dir):
        log.info("weights missing in %s: downloading %s (once; later boots reuse them)", weights_dir, REPO_ID)
        try:
            download(weights_dir)
        except DownloadError:
            raise
        except Exception as e:  # no network, hub down, auth: say what to do instead
            raise FileNotFoundError(
                f"notus-7b-v1 weights are not in {weights_dir} and could not be downloaded from "
                f"the Hugging Face hub ({type(e).__name__}: {e}). On a machine with network, run "
                f"`{DOWNLOAD_COMMAND} --dir {weights_dir}`, or copy the files of {REPO_ID} "
                f"(safetensors shards, index, config and tokenizer files) into {weights_dir}."
            ) from e
    return require_weights(weights_dir)


def file_digest(path: Path, lfs: bool) -> str:
    """sha256 for LFS files; for plain git files the git blob sha1, which is what the hub records."""
    h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def download(weights_dir: str | Path = DEFAULT_WEIGHTS_DIR, revision: str = REVISION) -> Path:
    """Fetches the model files into `weights_dir`, verifies each, records the result.

    huggingface_hub shows progress bars, resumes interrupted files and uses its fastest transfer
    (hf_xet where the repo is stored on Xet). Honours HF_ENDPOINT and HF_TOKEN.
    """
    from huggingface_hub import HfApi, snapshot_download

    weights_dir = Path(weights_dir)
    info = HfApi().model_info(REPO_ID, revision=revision, files_metadata=True)
    files = [s for s in info.siblings if any(fnmatch.fnmatch(s.rfilename, p) for p in ALLOW_PATTERNS)]
    log.info("downloading %s at commit %s into %s", REPO_ID, info.sha, weights_dir)
    # The commit sha, not the branch name: every file comes from the same commit.
    snapshot_download(repo_id=REPO_ID, revision=info.sha, local_dir=str(weights_dir),
                      allow_patterns=[s.rfilename for s in files])
    verified = {}
    for sibling in files:
        path = weights_dir / sibling.rfilename
        lfs = sibling.lfs is not None
        expected_size = sibling.lfs.size if lfs else sibling.size
        expected_hash = sibling.lfs.sha256 if lfs else sibling.blob_id
        size = path.stat().st_size if path.exists() else None
        digest = file_digest(path, lfs) if size == expected_size else None
        if digest != expected_hash:
            path.unlink(missing_ok=True)  # so the next run fetches it again instead of keeping it
            raise DownloadError(
                f"{path} does not match the hub's record (size {size} vs {expected_size}, "
                f"{'sha256' if lfs else 'git sha1'} {digest} vs {expected_hash}); it was deleted. "
                f"Run `{DOWNLOAD_COMMAND} --dir {weights_dir}` again."
            )
        verified[sibling.rfilename] = {"size": size, ("sha256" if lfs else "git_sha1"): digest}
        log.info("verified %s", sibling.rfilename)
    manifest = {"repo_id": REPO_ID, "commit": info.sha, "files": verified}
    (weights_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return weights_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=f"Download {REPO_ID} into weights/, verified.")
    parser.add_argument("--dir", default=str(DEFAULT_WEIGHTS_DIR), help="where to put the files")
    parser.add_argument("--revision", default=REVISION, help="hub branch, tag or commit sha")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = download(args.dir, args.revision)
    except DownloadError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"weights ready and verified in {path}")
