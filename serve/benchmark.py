"""Serving benchmark (prints figures, writes JSON): latency and QPS of /search/text over HTTP, the
same queries through the bare library in the same run (so the Serve overhead is a ratio), the
first query after deploy, and a fuzz run.

    python serve/benchmark.py --model runs/cpu/best --library chebi20=runs/index/molecules \
        --library moses_1m=runs/index/moses_1m --out results/benchmark_serve.json

Libraries are index directories built by jobs/index.py from real molecules (NAME=PATH, repeatable).
The fuzz run (on the first library) sends --fuzz random or mutated requests, filters and page
requests included, and counts 5xx answers (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import time
from urllib.parse import quote
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUERIES = [
    "The molecule is an aryl propionic acid that is an anti-inflammatory agent and inhibits cyclooxygenase.",
    "The molecule is a monocarboxylic acid anion obtained by deprotonation of the carboxy group.",
    "The molecule is a steroid hormone with a ketone at position 3.",
    "The molecule is a beta-lactam antibiotic.",
    "The molecule is a flavonoid found in plants with antioxidant activity.",
]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def load(client: httpx.AsyncClient, path: str, bodies: list[dict], concurrency: int) -> dict:
    latencies, statuses, queue = [], [], list(bodies)

    async def worker():
        while queue:
            body = queue.pop()
            started = time.perf_counter()
            response = await client.post(path, json=body)
            latencies.append(time.perf_counter() - started)
            statuses.append(response.status_code)

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": len(bodies), "qps": len(bodies) / wall,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
            "non_200": sum(s != 200 for s in statuses)}


def bare_library(model_dir: str, index_dir: str, queries: list[str], k: int = 10) -> dict:
    from tmr.index import RetrievalIndex
    from tmr.model import from_pretrained

    model, index = from_pretrained(model_dir), RetrievalIndex(index_dir)
    latencies = []
    for text in queries:
        started = time.perf_counter()
        scores, rows = index.search(model.encode_text([text]).numpy(), k)
        [index.record(r) for r in rows[0]]
        latencies.append(time.perf_counter() - started)
    return {"requests": len(queries), "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99), "qps": len(queries) / sum(latencies)}


def fuzz_bodies(count: int, seed: int = 0) -> list[tuple[str, object]]:
    rng = random.Random(seed)
    alphabet = "CNOSPFIBrcl()[]=#@+-1234567890%/\\.*$ \t\n\u00e9\u4e2d\U0001F600"
    paths = ["/search/text", "/search/molecule", "/describe", "/embed"]
    out = []
    for _ in range(count):
        path = rng.choice(paths)
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        choice = rng.random()
        if choice < 0.1:
            body = {"text": "a carboxylic acid", "k": rng.randint(0, 30), "filters": rng.choice([
                {"smarts": junk}, {"mw": [rng.uniform(-100, 900), rng.uniform(-100, 900)]}, {"lipinski": junk},
                {junk: [1, 2]}, {"tpsa": junk}, {"hbd": [None, rng.randint(-2, 6)], "smarts": "c1ccccc1"}])}
        elif choice < 0.15:
            path = rng.choice(["/depict?smiles=", "/export?format=csv&mode=text&q=", "/export?format=sdf&smarts=",
                               "/static/", "/?q="]) + quote(junk, safe="")
            body = "GET"
        elif choice < 0.3:
            body = {"text": junk, "k": rng.choice([-5, 0, 1, 10, 1000, 1001, 10**12, "x", None, 3.5])}
        elif choice < 0.6:
            body = {"smiles": rng.choice([junk, "CCO", "c1ccccc1" + junk, "C" * rng.randint(0, 3000)]),
                    "k": rng.randint(-3, 1200)}
        elif choice < 0.8:
            body = {"texts": [junk] * rng.randint(0, 300), "smiles": [junk] * rng.randint(0, 3)}
        else:
            body = rng.choice([None, [], "string", 42, {"unexpected": junk}, junk])
        out.append((path, body))
    return out


async def fuzz(client: httpx.AsyncClient, count: int) -> dict:
    counts: dict[str, int] = {}
    for path, body in fuzz_bodies(count):
        if body == "GET":
            response = await client.get(path)
        elif isinstance(body, str) and random.random() < 0.5:
            response = await client.post(path, content=body.encode(), headers={"content-type": "application/json"})
        else:
            response = await client.post(path, json=body)
        key = f"{response.status_code // 100}xx"
        counts[key] = counts.get(key, 0) + 1
    return {"requests": count, "by_class": counts, "5xx": counts.get("5xx", 0)}


def start_local_serve(num_cpus: int = 4) -> int:
    """A local Ray (this checkout on the workers' PYTHONPATH) and Serve's HTTP proxy on a free
    loopback port, which it returns."""
    import ray
    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=512 * 1024**2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def main() -> None:
    from ray import serve

    from serve.app import build_app

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--library", required=True, action="append", help="NAME=index directory (jobs/index.py)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--fuzz", type=int, default=2000)
    parser.add_argument("--encoder-max-replicas", type=int, default=1,
                        help="autoscaling bound of the encoder (1 on a 2-core machine: more replicas only contend)")
    parser.add_argument("--out", default="results/benchmark_serve.json")
    args = parser.parse_args()
    libraries = {}
    for spec in args.library:
        name, _, path = spec.rpartition("=")
        libraries[name or Path(path).name] = {"path": path, **json.loads((Path(path) / "manifest.json").read_text())}
    port = start_local_serve()
    report = {"libraries": {}, "device": "cpu (2 cores)"}
    queries = [QUERIES[i % len(QUERIES)] + f" ({i})" for i in range(args.requests)]
    for name, library in libraries.items():
        serve.run(build_app({"model_dir": args.model, "molecules": library["path"],
                             "encoder_max_replicas": args.encoder_max_replicas}), name="bench", route_prefix="/")

        async def measure():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                first = await load(client, "/search/text", [{"text": "The molecule is a first query.", "k": 10}], 1)
                await load(client, "/search/text", [{"text": q, "k": 10} for q in queries[:10]], 4)  # warm-up
                runs = [await load(client, "/search/text", [{"text": q, "k": 10} for q in queries], c) for c in (1, 8, 32)]
                return first, runs

        first, runs = asyncio.run(measure())
        bare = bare_library(args.model, library["path"], queries)
        report["libraries"][name] = {
            "count": library["count"], "index": library["index"], "recall_at_10": library.get("recall_at_10"),
            "search_params": library.get("search_params"), "first_query_after_deploy_ms": first["p50_ms"],
            "http": runs, "bare_library": bare,
            "serve_overhead_p50_ratio_c1": runs[0]["p50_ms"] / bare["p50_ms"]}
        print(name, json.dumps(report["libraries"][name], indent=2), flush=True)
        if name == next(iter(libraries)):
            async def fuzz_run():
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                    return await fuzz(client, args.fuzz)

            report["fuzz"] = asyncio.run(fuzz_run())
            print("fuzz", report["fuzz"], flush=True)
        serve.delete("bench")
    serve.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "libraries"}, indent=2))


if __name__ == "__main__":
    main()
