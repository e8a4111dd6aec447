#!/usr/bin/env python
"""Download notus-7b-v1's weights into weights/ (see notus/weights.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from notus.weights import main  # noqa: E402

if __name__ == "__main__":
    main()
