"""Beyond one machine: a 2-node Ray cluster simulated on this one (`ray.cluster_utils.Cluster`),
each node with its own tmr cache directory, as separate machines have.
The index build runs its actors on both nodes and writes the same index as an in-process build;
Serve places the 4 shards of that index on both nodes and they answer as the library does; a
training run puts one worker on each node, each node featurises and caches its data once, and the
model it trains equals the one the same run trains on a single machine."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tmr.config import load_config
from tmr.library import build_index
from tmr.model import create_model, from_pretrained

REPO = Path(__file__).resolve().parents[1]
SINGLE_NODE_RUN = """
import json, sys
import ray
from tmr.config import config_from_dict
from tmr.distributed import train_with_ray
ray.init(address="local", num_cpus=4, object_store_memory=150 * 1024**2, include_dashboard=False)
train_with_ray(config_from_dict(json.loads(sys.argv[1])), threads_per_worker=2)
"""
QUERY = "The molecule is a monocarboxylic acid anion obtained by deprotonation of the carboxy group."


@pytest.fixture(scope="module")
def node_caches(tmp_path_factory) -> dict[str, Path]:
    return {node: tmp_path_factory.mktemp(f"cache_{node}") for node in ("node_a", "node_b")}


@pytest.fixture(scope="module")
def two_nodes(node_caches):
    import ray
    from ray.cluster_utils import Cluster

    def node(name: str) -> dict:  # a raylet's environment is its workers' environment
        return {"num_cpus": 2, "resources": {name: 1}, "object_store_memory": 150 * 1024**2,
                "env_vars": {"TMR_CACHE": str(node_caches[name])}}

    cluster = Cluster(initialize_head=True, head_node_args=node("node_a"))
    cluster.add_node(**node("node_b"))
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_index_build_and_shards_span_both_nodes(two_nodes, small_root, tmp_path):
    import ray
    from ray import serve

    sys.path.insert(0, str(REPO))
    from serve.app import build_app

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    model = create_model(load_config("tiny").model).save_pretrained(tmp_path / "model")
    library = small_root / "validation.txt"
    # the same chunks and threads per model give the same index, bit for bit, in one process or
    # spread over nodes (OpenBLAS's products round differently with another thread count)
    reference = build_index(library, model, tmp_path / "reference", chunk_size=30, threads=2, use_ray=False,
                            progress=False)
    # 2 actors of 2 CPUs each cannot share a 2-CPU node: one embeds on each
    built = build_index(library, model, tmp_path / "molecules", chunk_size=30, actors=2, threads=2, progress=False)
    assert built["embeddings_sha256"] == reference["embeddings_sha256"]
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(built["chunks_per_node"]) == nodes, built["chunks_per_node"]  # both nodes embedded chunks
    assert sum(built["chunks_per_node"].values()) == 4

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_dir": str(model), "molecules": str(tmp_path / "molecules"), "shards": 4}),
              name="spread", route_prefix="/")
    try:
        shards = httpx.get(f"http://127.0.0.1:{port}/info", timeout=60).json()["molecule_shards"]
        assert len({s["node"] for s in shards}) == 2, f"shards were not placed on both nodes: {shards}"
        assert sum(s["rows"] for s in shards) == built["count"]
        answer = httpx.post(f"http://127.0.0.1:{port}/search/text", json={"text": QUERY, "k": 20}, timeout=60)
        assert answer.status_code == 200, answer.text
        embeddings = np.load(tmp_path / "molecules/embeddings.npy")
        scores = embeddings @ from_pretrained(model).encode_text([QUERY])[0].numpy()
        ids = pq.read_table(tmp_path / "molecules/metadata.parquet").column("id").to_pylist()
        expected = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-scores[i], i))[:20]]
        assert [r["id"] for r in answer.json()["results"]] == expected
    finally:
        serve.shutdown()


def test_training_puts_one_worker_on_each_node_and_each_node_caches_once(two_nodes, node_caches, train_root, tmp_path):
    """2 workers of 2 CPUs on two 2-CPU nodes: one per node. Each worker is its node's local rank 0,
    so each node featurises the pairs and computes the frozen text backbone's states itself, into
    its own cache, and the two caches hold the same files; gradients cross nodes over gloo."""
    from tmr.distributed import train_with_ray

    config = load_config("tiny", [f"data={train_root}", f"output={tmp_path / 'run'}", "train.num_workers=2",
                                  "train.max_train_pairs=64", "train.epochs=1", "model.text.trainable_layers=0",
                                  "train.cache_text_states=true"])
    metrics = train_with_ray(config, threads_per_worker=2)
    assert metrics["num_workers"] == 2 and len(metrics["history"]) == 1

    # the same run on one machine (its own single-node Ray, 2 workers of 2 threads): gradients that
    # crossed nodes trained the same model
    single = load_config("tiny", [f"output={tmp_path / 'single'}"])
    single.data, single.model, single.train = config.data, config.model, config.train
    reference = subprocess.run([sys.executable, "-c", SINGLE_NODE_RUN, json.dumps(single.to_dict())], text=True,
                               capture_output=True, timeout=900, env={**os.environ, "TMR_CACHE": str(tmp_path / "cache")})
    assert reference.returncode == 0, reference.stderr[-3000:]
    alone = json.loads((tmp_path / "single/metrics.json").read_text())
    for key in ("train_loss", "val_mrr_t2m", "val_mrr_m2t"):
        assert metrics["history"][0][key] == pytest.approx(alone["history"][0][key], rel=1e-6, abs=1e-6), key
    spread, together = (load_file(tmp_path / name / "best/model.safetensors") for name in ("run", "single"))
    assert spread.keys() == together.keys()
    for name, tensor in together.items():
        assert torch.allclose(spread[name], tensor, atol=1e-6), name

    def cached(node: str) -> dict[str, int]:
        root = node_caches[node]
        return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
                if p.is_file() and p.parts[len(root.parts)] in ("processed", "text_states")}

    a, b = cached("node_a"), cached("node_b")
    assert any(k.startswith("processed/") for k in a) and any(k.startswith("text_states/") for k in a), a
    assert a == b, "each node should have featurised and cached the same data for its own worker"
