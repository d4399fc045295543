"""Shared fixtures: the real ChEBI-20 validation file (../shared) and small data roots cut from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmr.config import load_config
from tmr.data import resolve_data_root


@pytest.fixture(scope="session")
def chebi_root() -> Path:
    root = resolve_data_root(download=False)
    if not (root / "validation.txt").exists():
        pytest.fail(f"ChEBI-20 validation.txt not found at {root}; set TMR_DATA or place ../shared beside the checkout")
    return root


@pytest.fixture(scope="session")
def small_root(tmp_path_factory, chebi_root) -> Path:
    """A data root holding only validation.txt with the first 120 pairs of the real one."""
    root = tmp_path_factory.mktemp("chebi_small")
    lines = (chebi_root / "validation.txt").read_text(encoding="utf-8").splitlines()[:121]
    (root / "validation.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture()
def tiny_config():
    return load_config("tiny")


@pytest.fixture(scope="session")
def train_root(tmp_path_factory, chebi_root) -> Path:
    """A data root with train.txt (300 pairs) and validation.txt (100 pairs), cut from the real file."""
    root = tmp_path_factory.mktemp("chebi_train")
    header, *rows = (chebi_root / "validation.txt").read_text(encoding="utf-8").splitlines()
    (root / "train.txt").write_text("\n".join([header] + rows[:300]) + "\n", encoding="utf-8")
    (root / "validation.txt").write_text("\n".join([header] + rows[300:400]) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def local_ray(request):
    """A local 2-CPU Ray for one test module; Ray workers cannot import test modules, so the
    module's functions (train loops defined there) are pickled by value."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False)
    ray.cloudpickle.register_pickle_by_value(request.module)
    yield
    ray.shutdown()
