"""Shared fixtures: the real ChEBI-20 validation file (../shared) and small data roots cut from it."""

from __future__ import annotations

import os
import sys
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


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_root):
    """The Serve app on loopback over a tiny model and the 120-pair library (molecules and texts),
    once unsharded at / and once with 4 shards at /sharded, in Serve's high-throughput mode as
    users run it (HAProxy, the ingress serving HTTP itself); yields (httpx client, directory)."""
    import httpx
    import ray
    from ray import serve

    from tmr.library import build_index
    from tmr.model import create_model

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from serve.app import SERVE_ENV, build_app
    from serve.benchmark import start_local_serve

    root = tmp_path_factory.mktemp("serve")
    create_model(load_config("tiny").model).save_pretrained(root / "model")
    library = small_root / "validation.txt"
    for kind in ("molecule", "text"):
        build_index(library, root / "model", root / kind, kind, use_ray=False, progress=False)
    saved = {name: os.environ.get(name) for name in SERVE_ENV}
    port = start_local_serve(num_cpus=4)
    args = {"model_dir": str(root / "model"), "molecules": str(root / "molecule"), "texts": str(root / "text")}
    serve.run(build_app(args), name="one", route_prefix="/")
    serve.run(build_app({**args, "shards": 4}), name="sharded", route_prefix="/sharded")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, root
    serve.shutdown()
    ray.shutdown()
    for name, value in saved.items():  # the rest of the session's Ray clusters start as before
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
