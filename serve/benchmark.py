"""Serving benchmark (prints figures, writes JSON): latency and QPS of /search/text over HTTP at c=1, 8
and 32 for two kinds of real query, reported apart with their token lengths: short user-style
sentences and ChEBI-20 validation descriptions, every measured query distinct (none answered from
the query cache; repeats are measured apart). In the same run: the same queries through the bare
library in one process with the replica's text engine (the Serve overhead as a ratio, from the two
asked query by query in alternating order, so that both meet the machine in the same minute), the
encoder's own batched throughput right before and after the c=32 run (the ceiling c=32 is a share
of their mean), the first query after deploy,
where a request's time goes (the p50 of each stage the ingress reports in its Server-Timing header:
encode, search, decorate, and what lies outside its handler) and a fuzz run.

The load client is aiohttp, on the same 2 cores as the server: httpx's AsyncClient took ~4 ms of
CPU per request here against aiohttp's ~0.35 (1,500 requests at c=32 to a static endpoint), time
the server's own queries lost to the client. Each level reports the client's CPU per request.

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
from contextlib import asynccontextmanager
from urllib.parse import quote
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve.requests import Timings  # noqa: E402

# Short user-style queries: what a chemist types into the page (distinct: a repeat would hit the query cache)
SUBJECTS = ["an aryl propionic acid", "a beta-lactam antibiotic", "a steroid hormone", "a flavonoid",
            "a monocarboxylic acid anion", "an opioid analgesic", "a sulfonamide", "a purine nucleoside",
            "a quinolone antibacterial", "a tetracyclic terpenoid", "a benzodiazepine", "a fatty acid ester",
            "an indole alkaloid", "a cephalosporin", "a glucoside", "a tertiary amine", "a coumarin",
            "a catecholamine", "a macrolide", "a phenothiazine"]
ROLES = ["that inhibits COX-2", "with anti-inflammatory activity", "used as an antidepressant",
         "that is a plant metabolite", "with antioxidant activity", "that blocks calcium channels",
         "used against malaria", "that is a human metabolite", "with antifungal activity", "used as a herbicide"]


def short_queries(count: int) -> list[str]:
    queries = [f"{subject} {role}" for role in ROLES for subject in SUBJECTS]
    if count > len(queries):
        raise SystemExit(f"--requests {count}: at most {len(queries)} distinct short queries")
    return random.Random(0).sample(queries, count)


def chebi_queries(count: int, skip: int = 0) -> list[str]:
    """Distinct ChEBI-20 validation descriptions (what the page's example is), from the data root."""
    from tmr.data import MoleculeTextDataset, resolve_data_root

    texts = list(dict.fromkeys(MoleculeTextDataset(resolve_data_root() / "validation.txt", progress=False).texts))
    return texts[skip:skip + count]


def token_lengths(model_dir: str, texts: list[str]) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(model_dir) / "text_encoder")
    lengths = [len(tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts]
    return {"mean": float(np.mean(lengths)), "p50": percentile(lengths, 50), "max": max(lengths)}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class HttpxSession:
    """httpx.AsyncClient behind aiohttp's `post` interface: `--client httpx`, the client before."""

    def __init__(self, port: int):
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.client.aclose()

    @asynccontextmanager
    async def post(self, path: str, json: dict):
        response = await self.client.post(path, json=json)  # read whole: read() below only hands it over

        async def read() -> bytes:
            return response.content

        yield SimpleNamespace(status=response.status_code, headers=response.headers, read=read)


async def load(client: aiohttp.ClientSession, path: str, bodies: list[dict], concurrency: int) -> dict:
    """Latency and QPS of `bodies` at `concurrency`, and where the time went: the p50 of each stage the
    ingress reports (Server-Timing) and of what lies outside its handler (HTTP, Serve's proxy and
    router, request parsing, JSON); and this client's CPU per request (it shares the server's cores)."""
    latencies, statuses, stages, queue = [], [], [], list(bodies)

    async def worker():
        while queue:
            body = queue.pop()
            started = time.perf_counter()
            async with client.post(path, json=body) as response:
                await response.read()
            latencies.append(time.perf_counter() - started)
            statuses.append(response.status)
            timing = Timings.parse(response.headers.get("server-timing", ""))
            if "handler" in timing:
                stages.append({**timing, "outside_handler": 1000 * latencies[-1] - timing["handler"]})

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    names = list(dict.fromkeys(name for timing in stages for name in timing))
    return {"concurrency": concurrency, "requests": len(bodies), "qps": len(bodies) / wall,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
            "non_200": sum(s != 200 for s in statuses), "client_cpu_ms_per_request": 1000 * cpu / len(bodies),
            "stages_p50_ms": {name: percentile([t.get(name, 0.0) for t in stages], 50) for name in names}}


def session(port: int, kind: str = "aiohttp"):
    if kind == "httpx":
        return HttpxSession(port)
    return aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=120))


class BareLibrary:
    """The library in this process, with the engine a replica uses: what a user calling tmr gets."""

    def __init__(self, model_dir: str, index_dir: str, threads: int = 1):
        import torch

        from tmr.fast_text import text_encoder_for
        from tmr.index import RetrievalIndex
        from tmr.model import from_pretrained

        torch.set_num_threads(threads)
        self.threads, self.index = threads, RetrievalIndex(index_dir)
        self.encode, self.engine = text_encoder_for(from_pretrained(model_dir), model_dir, threads)

    def query(self, text: str, k: int = 10) -> dict:
        """One query end to end (ms), and its stages: the encode's wall and CPU time, the search with its records."""
        started, started_cpu = time.perf_counter(), time.thread_time()
        vector = self.encode([text]).numpy()
        encode_ms, encode_cpu_ms = 1000 * (time.perf_counter() - started), 1000 * (time.thread_time() - started_cpu)
        _, rows = self.index.search(vector, k)
        self.index.records(rows[0])
        total = 1000 * (time.perf_counter() - started)
        return {"ms": total, "encode": encode_ms, "encode_cpu": encode_cpu_ms, "search_and_records": total - encode_ms}

    def run(self, queries: list[str]) -> dict:
        for text in queries[:5]:
            self.encode([text])
        timed = [self.query(text) for text in queries]
        latencies = [t["ms"] for t in timed]
        return {"requests": len(queries), "engine": self.engine, "threads": self.threads,
                "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "qps": 1000 * len(timed) / sum(latencies),
                # the stages a served request reports as forward / forward_cpu / search, here in one thread
                "stages_p50_ms": {name: percentile([t[name] for t in timed], 50)
                                  for name in ("encode", "encode_cpu", "search_and_records")}}

    def ceiling(self, queries: list[str]) -> float:
        """The encoder's own throughput, texts per second: batches of 32 (the served batch size), one thread."""
        started = time.perf_counter()
        for i in range(0, len(queries), 32):
            self.encode(queries[i:i + 32])
        return len(queries) / (time.perf_counter() - started)


async def paired(client: aiohttp.ClientSession, bare: BareLibrary, texts: list[str]) -> dict:
    """Serve and the bare library on the same queries, query by query, in alternating order: both meet the
    machine in the same minute. These shared cores drift by 10-20% from one minute to the next (the same
    forward's CPU time went from 8.2 to 10.2 ms between the phases of one run), and a ratio of two phases
    measured a minute apart carried that drift into what it calls Serve's overhead."""
    served, stages, alone = [], [], []

    async def ask(text: str) -> None:
        started = time.perf_counter()
        async with client.post("/search/text", json={"text": text, "k": 10}) as response:
            await response.read()
        if response.status != 200:
            raise RuntimeError(f"/search/text answered {response.status}")
        served.append(1000 * (time.perf_counter() - started))
        stages.append(Timings.parse(response.headers.get("server-timing", "")))

    for i, text in enumerate(texts):
        if i % 2:
            alone.append(bare.query(text))
            await ask(text)
        else:
            await ask(text)
            alone.append(bare.query(text))
    bare_ms = [a["ms"] for a in alone]
    return {"requests": len(texts), "served_p50_ms": percentile(served, 50), "bare_p50_ms": percentile(bare_ms, 50),
            "ratio_p50": percentile(served, 50) / percentile(bare_ms, 50),
            "ratio_of_pairs_p50": percentile([s / b for s, b in zip(served, bare_ms)], 50),
            # the same forward's CPU time in the replica and here, and the two searches
            "served_stages_p50_ms": {name: percentile([t.get(name, 0.0) for t in stages], 50)
                                     for name in ("forward", "forward_cpu", "encode", "search", "handler")},
            "bare_stages_p50_ms": {name: percentile([a[name] for a in alone], 50)
                                   for name in ("encode", "encode_cpu", "search_and_records")}}


def decoration_cost(index, count: int = 2000) -> dict:
    """Per molecule, one core: what an index build now adds (InChIKey + properties, tmr.chem) beside
    what it already did (parse + featurise), and what a served result cost when they were computed
    per request (the same, parsing its SMILES again, on a cold cache) against reading them stored."""
    from rdkit import Chem

    from tmr.chem import inchikey_of, properties_of
    from tmr.data.featurize import graph_batch, parse_smiles

    smiles = index.metadata.column("smiles").slice(0, count).to_pylist()
    started = time.perf_counter()
    parsed = [parse_smiles(s).mol for s in smiles]
    graph_batch(parsed)
    featurise = time.perf_counter() - started
    started = time.perf_counter()
    for mol in parsed:
        inchikey_of(mol), properties_of(mol)
    decorate = time.perf_counter() - started
    started = time.perf_counter()
    for s in smiles:
        mol = Chem.MolFromSmiles(s)
        inchikey_of(mol), properties_of(mol)
    per_request = time.perf_counter() - started
    started = time.perf_counter()
    for start in range(0, len(smiles), 10):
        index.records(np.arange(start, min(start + 10, len(smiles))))
    stored = time.perf_counter() - started
    per = 1000 / len(smiles)
    return {"molecules": len(smiles), "parse_and_featurise_ms": featurise * per, "build_decoration_ms": decorate * per,
            "served_computed_ms_per_result": per_request * per, "served_stored_ms_per_result": stored * per}


# At the caps (tmr.chem): the costliest requests the API still accepts. A chain of small rings is
# the slowest shape to lay out of those tried (0.2 s at 255 atoms, against 0.03 s for a 300-atom chain).
RING_CHAIN_300 = "C1CC(CC1)" * 60  # 300 heavy atoms: 60 cyclopentanes in a chain
SMARTS_AT_CAPS = "[$(c1ccccc1)][$(C(=O)O)]" + "C" * 28  # 30 atoms, 2 recursive environments: passes nothing


async def worst_requests(port: int) -> dict:
    """Wall time of the most expensive requests the caps allow, one at a time on a warm app."""
    from tmr.chem import MAX_ATOMS

    timed = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        requests = {
            "depict_300_atoms": ("GET", "/depict", {"smiles": RING_CHAIN_300}),
            "depict_300_atoms_with_300_atom_query": ("GET", "/depict", {"smiles": RING_CHAIN_300,
                                                                        "query": "C" * MAX_ATOMS}),
            "structure_query_300_atoms": ("POST", "/search/molecule", {"smiles": RING_CHAIN_300, "k": 10}),
            "smarts_filter_nothing_passes": ("POST", "/search/text", {"text": "a quinone (worst)", "k": 10,
                                                                      "filters": {"smarts": SMARTS_AT_CAPS}}),
        }
        for name, (method, path, payload) in requests.items():
            started = time.perf_counter()
            response = await (client.get(path, params=payload) if method == "GET" else client.post(path, json=payload))
            timed[name] = {"ms": 1000 * (time.perf_counter() - started), "status": response.status_code}
    return timed


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


def start_local_serve(num_cpus: int = 4, env: dict[str, str] | None = None) -> int:
    """A local Ray (this checkout on the workers' PYTHONPATH) and Serve's HTTP entry on a free
    loopback port, which it returns. `env`: Serve's settings (default serve.app.SERVE_ENV, its
    high-throughput mode), set before Ray starts so that every Serve process has them."""
    import os

    import ray
    from ray import serve

    from serve.app import SERVE_ENV

    env = SERVE_ENV if env is None else env
    os.environ.update(env)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=512 * 1024**2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def main() -> None:
    from ray import serve

    from serve.app import SERVE_ENV, build_app

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--library", required=True, action="append", help="NAME=index directory (jobs/index.py)")
    parser.add_argument("--requests", type=int, default=150, help="measured queries per kind and concurrency")
    parser.add_argument("--fuzz", type=int, default=2000)
    parser.add_argument("--encoder-max-replicas", type=int, default=1,
                        help="autoscaling bound of the encoder (1 on a 2-core machine: more replicas only contend)")
    parser.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a Ray Serve setting over serve.app.SERVE_ENV, e.g. RAY_SERVE_ENABLE_HA_PROXY=0 (repeatable)")
    parser.add_argument("--app", action="append", default=[], metavar="NAME=VALUE",
                        help="an argument of the Serve app (serve.app:build_app), e.g. search_in_ingress=false")
    parser.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp",
                        help="the load client (httpx: the one before, ~10x the CPU per request)")
    parser.add_argument("--out", default="results/benchmark_serve.json")
    args = parser.parse_args()
    serve_env = {**SERVE_ENV, **dict(spec.split("=", 1) for spec in args.serve_env)}
    app_args = dict(spec.split("=", 1) for spec in args.app)
    libraries = {}
    for spec in args.library:
        name, _, path = spec.rpartition("=")
        libraries[name or Path(path).name] = {"path": path, **json.loads((Path(path) / "manifest.json").read_text())}
    port = start_local_serve(env=serve_env)
    report = {"libraries": {}, "device": "cpu (2 cores)", "query_sets": {}, "serve_env": serve_env, "app": app_args,
              "client": args.client}
    # distinct queries per set and per use: a warm-up, then the measured ones (none seen before)
    sets = {"short": short_queries(args.requests + 10), "chebi": chebi_queries(args.requests + 10)}
    for kind, texts in sets.items():
        report["query_sets"][kind] = {"requests": args.requests, "tokens": token_lengths(args.model, texts)}
    for name, library in libraries.items():
        serve.run(build_app({"model_dir": args.model, "molecules": library["path"],
                             "encoder_max_replicas": args.encoder_max_replicas, **app_args}), name="bench", route_prefix="/")

        async def measure(warm: list[str], measured: list[str]):
            async with session(port, args.client) as client:
                await load(client, "/search/text", [{"text": q, "k": 10} for q in warm], 4)
                runs, extra = {}, {}

                async def level(c: int) -> None:  # a suffix per level: every measured query is new to the query cache
                    runs[c] = await load(client, "/search/text", [{"text": f"{q} ({c})", "k": 10} for q in measured], c)

                await level(1)
                extra["paired"] = await paired(client, bare, [f"{q} (paired)" for q in measured])
                await level(8)
                # the ceiling measured right before and right after c=32: the share is of their mean
                ceiling_texts = [f"{q} (ceiling)" for q in measured]
                extra["ceilings"] = [bare.ceiling(ceiling_texts)]
                await level(32)
                extra["ceilings"].append(bare.ceiling(ceiling_texts))
                extra["repeats"] = await load(client, "/search/text", [{"text": f"{q} (1)", "k": 10} for q in measured[:50]], 1)
                return runs, extra

        async def first_query():
            async with session(port, args.client) as client:
                first = await load(client, "/search/text", [{"text": sets["chebi"][0] + " (first)", "k": 10}], 1)
                return {"ms": first["p50_ms"], "stages_ms": first["stages_p50_ms"]}

        result = {"count": library["count"], "index": library["index"], "recall_at_10": library.get("recall_at_10"),
                  "search_params": library.get("search_params"), "first_query_after_deploy": asyncio.run(first_query())}
        bare = BareLibrary(args.model, library["path"])
        for kind, texts in sets.items():
            runs, extra = asyncio.run(measure(texts[:10], texts[10:]))
            alone = bare.run([f"{q} (bare)" for q in texts[10:]])
            ceiling = float(np.mean(extra["ceilings"]))
            result[kind] = {"http": list(runs.values()), "repeated_queries_c1": extra["repeats"],
                            "bare_library": {**alone, "encoder_batched_texts_per_s": ceiling,
                                             "encoder_batched_texts_per_s_before_after_c32": extra["ceilings"]},
                            "paired_c1": extra["paired"],
                            # Serve over the bare library at one query at a time, query by query (paired above)
                            "serve_overhead_p50_ratio_c1": extra["paired"]["ratio_p50"],
                            # the same from two phases a minute apart (the c=1 run, then bare.run): drift included
                            "serve_overhead_p50_ratio_c1_separate_phases": runs[1]["p50_ms"] / alone["p50_ms"],
                            "c32_qps_share_of_encoder_ceiling": runs[32]["qps"] / ceiling}
        # the first query is a ChEBI-20 description: against the steady c=1 p50 of those
        result["first_query_after_deploy"]["over_steady_p50"] = (
            result["first_query_after_deploy"]["ms"] / result["chebi"]["http"][0]["p50_ms"])
        result["worst_allowed_requests_ms"] = asyncio.run(worst_requests(port))
        result["decoration_cost"] = decoration_cost(bare.index)
        del bare  # its copy of the library, before the next one loads
        report["libraries"][name] = result
        print(name, json.dumps(result, indent=2), flush=True)
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
