"""The Serve app over HTTP on a local Ray: answers equal the library's brute-force search, a sharded
index (4 shards) answers as the unsharded one, and every client mistake gets its 4xx with the reason."""

import os

import numpy as np
import pytest

from tmr.model import from_pretrained

QUERY = "The molecule is a monocarboxylic acid anion obtained by deprotonation of the carboxy group."


def brute_force(query: np.ndarray, embeddings: np.ndarray, k: int) -> list[int]:
    scores = embeddings @ query
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def test_text_search_equals_the_library(served):
    client, root = served
    model = from_pretrained(root / "model")
    response = client.post("/search/text", json={"text": QUERY, "k": 10})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    embeddings = np.load(root / "molecule/embeddings.npy")
    import pyarrow.parquet as pq

    ids = pq.read_table(root / "molecule/metadata.parquet").column("id").to_pylist()
    expected = brute_force(model.encode_text([QUERY])[0].numpy(), embeddings, 10)
    assert [r["id"] for r in results] == [ids[i] for i in expected]
    assert [r["rank"] for r in results] == list(range(1, 11))
    assert {"score", "smiles", "inchikey", "name"} <= set(results[0])
    assert results[0]["score"] == pytest.approx(float(embeddings[expected[0]] @ model.encode_text([QUERY])[0].numpy()), abs=1e-4)
    # where the time went, per stage (Server-Timing): every stage a text search takes, within the handler's total
    from serve.requests import Timings

    stages = Timings.parse(response.headers["server-timing"])
    assert set(stages) == {"forward", "forward_cpu", "encode", "search", "decorate", "handler"}
    assert all(0 < ms for ms in stages.values()) and stages["encode"] + stages["search"] + stages["decorate"] <= stages["handler"]
    assert stages["forward"] <= stages["encode"]  # the batcher's forward is inside the encode stage that waits for it
    assert stages["forward_cpu"] <= stages["forward"] + 0.01  # one thread's CPU time within its wall time


def test_molecule_search_and_describe_equal_the_library(served):
    client, root = served
    model = from_pretrained(root / "model")
    import pyarrow.parquet as pq

    query = model.encode_molecule(["OC(=O)CCc1ccccc1"])[0].numpy()
    answer = client.post("/search/molecule", json={"smiles": "OC(=O)CCc1ccccc1", "k": 5})
    assert answer.status_code == 200, answer.text
    response = answer.json()
    ids = pq.read_table(root / "molecule/metadata.parquet").column("id").to_pylist()
    assert [r["id"] for r in response["results"]] == [ids[i] for i in brute_force(query, np.load(root / "molecule/embeddings.npy"), 5)]
    assert response["query"] == "O=C(O)CCc1ccccc1" and all(0 <= r["tanimoto"] <= 1 for r in response["results"])
    described = client.post("/describe", json={"smiles": "OC(=O)CCc1ccccc1", "k": 3}).json()["results"]
    text_ids = pq.read_table(root / "text/metadata.parquet").column("id").to_pylist()
    assert [r["id"] for r in described] == [text_ids[i] for i in brute_force(query, np.load(root / "text/embeddings.npy"), 3)]
    assert all(r["text"] for r in described)


def test_sharded_index_answers_as_the_unsharded_one(served):
    client, _ = served
    for path, body in (("/search/text", {"text": QUERY, "k": 25}), ("/describe", {"smiles": "CCO", "k": 7}),
                       ("/search/molecule", {"smiles": "OC(=O)CCc1ccccc1", "k": 10, "filters": {"smarts": "c1ccccc1"}})):
        one, two = client.post(path, json=body).json(), client.post(f"/sharded{path}", json=body).json()
        assert [r["id"] for r in one["results"]] == [r["id"] for r in two["results"]]
        assert [r["score"] for r in one["results"]] == pytest.approx([r["score"] for r in two["results"]], abs=1e-6)


@pytest.mark.parametrize("path, body, status, reason", [
    ("/search/molecule", {"smiles": "C1CC", "k": 5}, 422, "C1CC"),
    ("/describe", {"smiles": "not a molecule"}, 422, "not a molecule"),
    ("/search/text", {"text": "   "}, 422, "empty"),
    ("/search/text", {"text": "x" * 4001}, 422, "4000"),
    ("/search/text", {"text": QUERY, "k": 0}, 422, "greater than or equal to 1"),
    ("/search/text", {"text": QUERY, "k": 1001}, 422, "less than or equal to 1000"),
    ("/search/text", {"k": 3}, 422, "text"),
    ("/search/text", {"text": 5}, 422, "string"),
    ("/embed", {"smiles": ["CCO", "C1CC"]}, 422, "C1CC"),
    ("/embed", {}, 422, "texts or smiles"),
    ("/embed", {"texts": ["ok", " "]}, 422, "empty"),
    ("/search/text", {"text": "y" * 70000}, 413, "at most"),
])
def test_client_mistakes_get_4xx_with_the_reason(served, path, body, status, reason):
    client, _ = served
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert reason in response.text


def test_malformed_json_health_info_and_embed(served):
    client, root = served
    assert client.post("/search/text", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["molecules"]["count"] == 120 and info["texts"] == 120 and info["dim"] == 64
    # one shard is searched in the ingress (no hop), four are their own deployments
    assert info["search_in_ingress"] and [s["rows"] for s in info["molecule_shards"]] == [120]
    # threads set explicitly in the replica (Ray sets no OMP_NUM_THREADS for a fractional CPU)
    assert info["threads"] == {"OMP_NUM_THREADS": "1", "torch": 1}
    # and at the niceness set for replicas (serve.app.REPLICA_NICENESS: Ray's 15 added to the niceness of the
    # process that started Ray), whatever Ray's own default for workers becomes
    from serve.app import REPLICA_NICENESS

    assert info["niceness"] == min(os.nice(0) + int(REPLICA_NICENESS), 19)
    sharded = client.get("/sharded/info").json()
    assert not sharded["search_in_ingress"] and [s["rows"] for s in sharded["molecule_shards"]] == [30] * 4
    embedded = client.post("/embed", json={"texts": [QUERY], "smiles": ["CCO"]}).json()
    model = from_pretrained(root / "model")
    assert np.allclose(embedded["texts"][0], model.encode_text([QUERY])[0].numpy(), atol=1e-5)
    assert np.allclose(embedded["smiles"][0], model.encode_molecule(["CCO"])[0].numpy(), atol=1e-5)


def test_a_lone_search_is_encoded_in_the_ingress_thread_with_the_answer_concurrent_ones_get(served):
    """A search alone in the ingress is encoded (and searched) in the event loop's thread, with no hop to
    a worker (counted apart); searches in flight together go through the batcher. The same answers."""
    from concurrent.futures import ThreadPoolExecutor

    client, _ = served
    texts = [f"The molecule is a steroid ester, number {i}." for i in range(12)]
    before = client.get("/info").json()["text_batches"]
    alone = [client.post("/search/text", json={"text": text, "k": 5}).json()["results"] for text in texts[:3]]
    middle = client.get("/info").json()["text_batches"]
    assert middle["in_caller"] == before["in_caller"] + 3 and middle["queries"] == before["queries"] + 3
    with ThreadPoolExecutor(12) as pool:  # 12 at once, each with a new text (the cache answers none)
        together = list(pool.map(lambda t: client.post("/search/text", json={"text": t + " ", "k": 5}).json(), texts))
    after = client.get("/info").json()["text_batches"]
    assert after["queries"] == middle["queries"] + 12
    # trailing space: the same tokens, so the same vector up to the engine's rounding
    assert [[r["id"] for r in answer["results"]] for answer in together[:3]] == [[r["id"] for r in a] for a in alone]


def test_a_repeated_query_is_answered_from_the_query_cache_with_the_same_answer(served):
    client, _ = served
    query = {"text": "The molecule is a short-chain fatty acid found in milk.", "k": 5}
    before = client.get("/info").json()["query_cache"]
    first = client.post("/search/text", json=query).json()
    middle = client.get("/info").json()["query_cache"]
    again = client.post("/search/text", json={**query, "k": 7}).json()  # another k: the same embedding
    after = client.get("/info").json()["query_cache"]
    assert (middle["misses"], middle["hits"]) == (before["misses"] + 1, before["hits"])
    assert (after["misses"], after["hits"]) == (middle["misses"], middle["hits"] + 1)
    assert again["results"][:5] == first["results"]
    assert client.get("/info").json()["text_engine"] == "onnxruntime"
    # molecules are keyed by canonical SMILES: another spelling of the same molecule hits
    client.post("/search/molecule", json={"smiles": "CCCC(=O)O", "k": 3})
    hits = client.get("/info").json()["query_cache"]["hits"]
    client.post("/search/molecule", json={"smiles": "OC(=O)CCC", "k": 3})
    assert client.get("/info").json()["query_cache"]["hits"] == hits + 1


def test_concurrent_misses_of_one_query_are_encoded_once():
    """A page fires the same query twice at once (a double click, a search and its export): one
    encoding, both answered with it; a failed encoding is not cached."""
    import asyncio

    from serve.requests import QueryCache

    calls = []

    async def encode():
        calls.append(1)
        await asyncio.sleep(0.05)
        return np.ones(3)

    async def fail():
        raise RuntimeError("encoder down")

    async def scenario():
        cache = QueryCache()
        first, second = await asyncio.gather(cache.get(("text", "q"), encode), cache.get(("text", "q"), encode))
        assert len(calls) == 1 and first is second
        assert cache.stats() == {"size": 1, "capacity": 4096, "hits": 0, "misses": 1, "joined": 1}
        with pytest.raises(RuntimeError):
            await cache.get(("text", "bad"), fail)
        assert await cache.get(("text", "bad"), encode) is not None and len(calls) == 2
        await cache.get(("text", "q"), encode)
        assert cache.stats()["hits"] == 1 and len(calls) == 2

    asyncio.run(scenario())


def test_concurrent_text_queries_share_forwards_of_similar_length_and_each_gets_its_own_vector():
    """The ingress's QueryBatcher: a lone query runs at once; the queries that arrive during a forward
    share the next one, short with short (padding), and a text over max_chars runs alone; each
    caller gets its own text's vector; a failed forward fails its own queries only; the forward's
    time and its CPU time reach the request's Server-Timing."""
    import asyncio
    import threading
    import time

    from serve.requests import QueryBatcher, Timings

    rng = np.random.default_rng(0)
    shorts, longs = [f"short {i}" for i in range(6)], [f"a much longer description, number {i}" for i in range(3)]
    vectors = {text: rng.normal(size=4) for text in ["first", *shorts, *longs, "fine", "slow"]}
    release, batches = threading.Event(), []

    def encode(texts):
        batches.append(list(texts))
        if texts == ["first"]:
            release.wait(10)  # busy: the next queries queue up behind it
        if "boom" in texts:
            raise RuntimeError("encoder failed")
        if texts == ["slow"]:
            time.sleep(0.05)
        return np.stack([vectors[t] for t in texts])

    async def scenario():
        batcher = QueryBatcher(encode, workers=1, max_chars=30)
        first = asyncio.ensure_future(batcher("first"))
        await asyncio.sleep(0.1)
        assert batches == [["first"]]  # started alone, with no batch window
        queued = [asyncio.ensure_future(batcher(t)) for t in [shorts[0], longs[0], *shorts[1:], *longs[1:]]]
        await asyncio.sleep(0.1)
        release.set()
        answers = await asyncio.gather(first, *queued)
        for text, answer in zip(["first", shorts[0], longs[0], *shorts[1:], *longs[1:]], answers):
            assert np.array_equal(answer, vectors[text]), text
        assert batches == [["first"], shorts, *[[text] for text in longs]]
        assert batcher.stats() == {"batches": 5, "queries": 10, "in_caller": 0}
        with pytest.raises(RuntimeError, match="encoder failed"):
            await batcher("boom")
        assert np.array_equal(await batcher("fine"), vectors["fine"])
        timings = Timings()
        timings.activate()
        assert np.array_equal(await batcher("slow"), vectors["slow"])
        assert 50 <= timings.stages["forward"] < 1000
        assert timings.stages["forward_cpu"] < 25  # sleeping took the forward's time, not its CPU
        # a query alone in its replica is encoded in the caller's thread, timed and counted as a batch of one
        here = Timings()
        here.activate()
        assert threading.current_thread() is threading.main_thread()
        assert np.array_equal(batcher.encode_here("slow"), vectors["slow"]) and batches[-1] == ["slow"]
        assert 50 <= here.stages["forward"] < 1000 and batcher.stats()["in_caller"] == 1

    asyncio.run(scenario())


def test_a_body_over_the_limit_is_a_413_with_or_without_a_length_and_a_body_under_it_arrives_whole():
    """serve.requests.BodyLimit (the ingress's middleware): by Content-Length, and for a chunked body
    (no length) by counting what arrives; a bad length is a 400; a chunked body under the limit
    reaches the handler byte for byte."""
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    from serve.requests import BodyLimit

    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=1000)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    client = TestClient(app)
    assert client.post("/echo", content=b"x" * 1000).json() == {"size": 1000}
    refused = client.post("/echo", content=b"x" * 1001)
    assert refused.status_code == 413 and "at most 1000" in refused.json()["detail"]
    chunks = lambda n: (b"y" * 100 for _ in range(n))  # noqa: E731: a generator body is sent chunked
    assert client.post("/echo", content=chunks(10)).json() == {"size": 1000}
    refused = client.post("/echo", content=chunks(11))
    assert refused.status_code == 413 and "over 1000" in refused.json()["detail"]
    bad = client.post("/echo", content=b"{}", headers={"content-length": "2x"})
    assert bad.status_code == 400
