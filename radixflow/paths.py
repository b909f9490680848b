"""Where radixflow keeps files between runs. Imports nothing from radixflow: every layer may use it."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """Root of radixflow's cache: $RADIXFLOW_CACHE_DIR or the platform's user cache dir."""
    return Path(os.environ.get("RADIXFLOW_CACHE_DIR") or platformdirs.user_cache_dir("radixflow"))
