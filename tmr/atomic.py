"""Atomic directory writes: build in a hidden staging directory beside the target, then swap it in.

A reader sees the old directory or the new one, never a half-written one; a crash mid-write
leaves only a hidden `.name.*` directory behind. Model directories, indexes and exported best
models are all written this way.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: str | Path):
    """`with atomic_directory(path) as staging:` write into staging; on success it becomes `path`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
