"""Atomic writes: build in a hidden staging file or directory beside the target, then swap it in.

A reader sees the old file or directory or the new one, never a half-written one; a crash mid-write
leaves only a hidden `.name.*` file or directory behind. Model directories, indexes and exported best
models are written with `atomic_directory`; caches, downloads and the Mol2vec table with `atomic_file`.
"""

from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def atomic_file(target: str | Path):
    """`with atomic_file(path) as partial:` write partial (same suffix: np.savez and friends keep
    the name); on success it replaces `path`. The name is private to this process, so processes
    writing the same target at once never write into one file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.{os.getpid()}.partial{target.suffix}")
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
