"""Where notus-7b-v1's weights live, and fetching them from the Hugging Face hub."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("notus")

REPO_ID = "argilla/notus-7b-v1"
# The hub revision the download fetches. "main" until a commit sha is pinned (see README).
REVISION = "main"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
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
            f"Fetch them with `{DOWNLOAD_COMMAND}` (about 14.5 GB), or point COG_WEIGHTS at a "
            f"directory that holds them."
        )
    return weights_dir


def download(weights_dir: str | Path = DEFAULT_WEIGHTS_DIR, revision: str = REVISION) -> Path:
    """Fetches the model files into `weights_dir` (honours HF_ENDPOINT and HF_TOKEN)."""
    from huggingface_hub import snapshot_download

    log.info("downloading %s@%s into %s", REPO_ID, revision, weights_dir)
    path = snapshot_download(
        repo_id=REPO_ID, revision=revision, local_dir=str(weights_dir), allow_patterns=ALLOW_PATTERNS
    )
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=f"Download {REPO_ID} into weights/.")
    parser.add_argument("--dir", default=str(DEFAULT_WEIGHTS_DIR), help="where to put the files")
    parser.add_argument("--revision", default=REVISION, help="hub branch, tag or commit sha")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = download(args.dir, args.revision)
    print(f"weights ready in {path}")
