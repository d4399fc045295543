"""Beyond one machine: a 2-node Ray cluster simulated on this one (`ray.cluster_utils.Cluster`).
The index build runs its actors on both nodes and writes the same index as an in-process build;
Serve places the 4 shards of that index on both nodes and they answer as the library does."""

import socket
import sys
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from tmr.config import load_config
from tmr.library import build_index
from tmr.model import create_model, from_pretrained

REPO = Path(__file__).resolve().parents[1]
QUERY = "The molecule is a monocarboxylic acid anion obtained by deprotonation of the carboxy group."


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"node_a": 1},
                                                           "object_store_memory": 150 * 1024**2})
    cluster.add_node(num_cpus=2, resources={"node_b": 1}, object_store_memory=150 * 1024**2)
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
    reference = build_index(library, model, tmp_path / "reference", chunk_size=30, use_ray=False, progress=False)
    # 2 actors of 2 CPUs each cannot share a 2-CPU node: one embeds on each
    built = build_index(library, model, tmp_path / "molecules", chunk_size=30, actors=2, threads=2, progress=False)
    assert built["embeddings_sha256"] == reference["embeddings_sha256"]

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
