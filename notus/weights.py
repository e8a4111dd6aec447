"""Where notus-7b-v1's weights live; fetching them from the Hugging Face hub, verified.

A download counts as complete only when every file matches the hub's recorded size and hash
(sha256 for LFS files, the git blob sha1 for small ones). What was verified is recorded in
weights/VERIFIED.json after each file, so a boot need not hash 14.5 GB again (setup compares sizes
instead) and a re-run skips what an earlier run already verified.

Transfers: over Xet (hf_xet, parallel chunks: the hub client's fastest) when the hub stores the file
there; otherwise over HTTP into weights/.cache/notus/<file>.<hash>.partial, which a later run
resumes with a Range request instead of starting the file over.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("notus")

REPO_ID = "argilla/notus-7b-v1"
# The hub revision the download fetches. "main" until a commit sha is pinned (see docs/serving.md); the
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
    index = weights_dir / "model.safetensors.index.json"
    if index.is_file():  # an interrupted download leaves some shards: the index names them all
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            shards = ["model.safetensors.index.json (unreadable)"]  # a download fetches it again
        missing += [name for name in shards if not (weights_dir / name).is_file()]
    elif not list(weights_dir.glob("*.safetensors")):
        missing.append("the *.safetensors weight shards")
    if _read_manifest(weights_dir).get("complete") is False:  # files it did not verify yet
        missing.append(f"the rest of an interrupted download ({MANIFEST} says incomplete)")
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
    missing = missing_files(weights_dir)
    if missing:
        log.info("weights missing in %s (%s): downloading %s (once; later boots reuse them)",
                 weights_dir, ", ".join(missing), REPO_ID)
        try:
            download(weights_dir)
        except DownloadError:
            raise
        except Exception as e:  # no network, hub down, auth: say what to do instead
            raise FileNotFoundError(
                f"notus-7b-v1 weights are not complete in {weights_dir} (missing "
                f"{', '.join(str(weights_dir / name) for name in missing)}) and could not be downloaded from "
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

    Files an earlier run verified are kept; an interrupted HTTP transfer resumes where it stopped.
    Progress bars come from huggingface_hub. Honours HF_ENDPOINT and HF_TOKEN.
    """
    from huggingface_hub import HfApi

    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    info = HfApi().model_info(REPO_ID, revision=revision, files_metadata=True)
    files = [s for s in info.siblings if any(fnmatch.fnmatch(s.rfilename, p) for p in ALLOW_PATTERNS)]
    log.info("downloading %s at commit %s into %s", REPO_ID, info.sha, weights_dir)
    manifest = _read_manifest(weights_dir)
    earlier = manifest.get("files", {}) if manifest.get("commit") == info.sha else {}
    verified: dict[str, dict] = {}
    for sibling in files:
        name, lfs = sibling.rfilename, sibling.lfs is not None
        record = {"size": sibling.lfs.size if lfs else sibling.size,
                  ("sha256" if lfs else "git_sha1"): sibling.lfs.sha256 if lfs else sibling.blob_id}
        path = weights_dir / name
        if earlier.get(name) == record and path.is_file() and path.stat().st_size == record["size"]:
            verified[name] = record  # verified by an earlier run of this commit
            continue
        if not _matches(path, record, lfs):
            path.unlink(missing_ok=True)
            # The commit sha, not the branch name: every file comes from the same commit. The
            # file gets its real name only once verified, so nothing unchecked is ever loaded.
            _fetch(name, info.sha, weights_dir, record, lfs)
        verified[name] = record
        log.info("verified %s", name)
        _write_manifest(weights_dir, info.sha, verified, complete=False)  # survives an interruption
    _write_manifest(weights_dir, info.sha, verified, complete=True)
    return weights_dir


def _size_and_digest(path: Path, record: dict, lfs: bool) -> tuple[int | None, str | None]:
    """The file's size, and its digest when the size is right (no point hashing otherwise)."""
    size = path.stat().st_size if path.is_file() else None
    return size, file_digest(path, lfs) if size == record["size"] else None


def _expected_digest(record: dict) -> str:
    return record.get("sha256") or record["git_sha1"]


def _matches(path: Path, record: dict, lfs: bool) -> bool:
    return _size_and_digest(path, record, lfs)[1] == _expected_digest(record)


def _verify(path: Path, record: dict, lfs: bool, weights_dir: Path, name: str) -> None:
    size, digest = _size_and_digest(path, record, lfs)
    expected = _expected_digest(record)
    if digest != expected:
        path.unlink(missing_ok=True)  # so the next run fetches it again instead of keeping it
        raise DownloadError(
            f"{weights_dir / name} does not match the hub's record (size {size} vs {record['size']}, "
            f"{'sha256' if lfs else 'git sha1'} {digest} vs {expected}); it was deleted. "
            f"Run `{DOWNLOAD_COMMAND} --dir {weights_dir}` again."
        )


def _fetch(name: str, commit: str, weights_dir: Path, record: dict, lfs: bool) -> None:
    """One file of the repo at `commit` into weights_dir/name, verified before it gets that name."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers
    from huggingface_hub.utils._runtime import is_xet_available

    url = hf_hub_url(REPO_ID, name, revision=commit)
    if is_xet_available() and get_hf_file_metadata(url).xet_file_data is not None:
        # Into a staging folder, then verified, then moved to its real name.
        staging = weights_dir / ".cache" / "notus" / "xet"
        hf_hub_download(REPO_ID, name, revision=commit, local_dir=staging)
        _verify(staging / name, record, lfs, weights_dir, name)
        (weights_dir / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, weights_dir / name)
        return
    # The hash in the name: a partial of another version of the file is never resumed.
    partial = weights_dir / ".cache" / "notus" / f"{name}.{_expected_digest(record)}.partial"
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(partial, "ab") as f:  # appends after what an earlier run got
            if f.tell() > record["size"]:  # not a prefix of this file: start it over
                f.seek(0)
                f.truncate()
            if f.tell():
                log.info("resuming %s at byte %d of %d", name, f.tell(), record["size"])
            # Resumes dropped connections itself (Range requests), and shows a progress bar.
            http_get(url, f, resume_size=f.tell(), headers=build_hf_headers(),
                     expected_size=record["size"], displayed_filename=name)
    except Exception as e:
        kept = partial.stat().st_size if partial.exists() else 0
        raise DownloadError(
            f"downloading {name} failed ({type(e).__name__}: {e}); {kept:,} of {record['size']:,} bytes "
            f"are kept in {partial}. Run `{DOWNLOAD_COMMAND} --dir {weights_dir}` again to resume."
        ) from e
    _verify(partial, record, lfs, weights_dir, name)
    (weights_dir / name).parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, weights_dir / name)


def _read_manifest(weights_dir: Path) -> dict:
    """VERIFIED.json, or {} where there is none (or it cannot be read: then nothing counts as verified)."""
    try:
        return json.loads((weights_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(weights_dir: Path, commit: str, files: dict[str, dict], complete: bool) -> None:
    manifest = {"repo_id": REPO_ID, "commit": commit, "complete": complete, "files": files}
    tmp = weights_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, weights_dir / MANIFEST)


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
