"""Ray Serve app: a trained tmr model as autoscaled retrieval replicas behind HTTP.

    Encoder (dynamic batching: /embed's lists)  ─┐
    MoleculeShard x N (faiss over 1/N of a library) ├─ Ingress (FastAPI): encodes a search's query,
    TextShard x N (texts, for /describe)        ─┘    merges top-k across shards

A single-shard library (the default, shards=1) is searched in the ingress itself, as its query is
encoded there: a search then makes no hop between replicas, and a search alone in the ingress no
hop between threads either (ALONE_MAX_K).

Start Ray with Serve's high-throughput mode (SERVE_ENV below, in the environment of `serve run` or
`ray start`): HAProxy in front, the ingress replica serving HTTP itself, gRPC between replicas, in
place of Serve's Python HTTP proxy (measured in docs/serving.md):

    export RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1
    serve run serve/config.yaml      (loopback; or serve deploy serve/config.yaml on a running cluster)
    serve run serve.app:app model_dir=runs/cpu/best molecules=runs/index/molecules texts=runs/index/texts

Endpoints: POST /search/text, /search/molecule, /describe, /embed; GET /health, /info; and for
people, GET / (the search page, serve/static/), /depict (a molecule as SVG) and /export (the
page's search as CSV or SDF). Molecule results carry the properties chemists screen by; searches
take `filters` (property ranges, Lipinski, SMARTS), applied here, looking further down the ranking
until k molecules pass. Client mistakes are 4xx with the reason (bad SMILES or SMARTS 422 naming
it, empty or over-long text 422, k outside 1..1000 422, oversized body 413); never a 500.
"""


import asyncio
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from ray import serve

from serve.requests import (STATIC, STATIC_TYPES, BodyLimit, EmbedRequest, Filters, MoleculeQuery,
                            QueryBatcher, QueryCache, TextQuery, Timings, parse_or_422, query_from_params,
                            query_structure, static_file)

# Ray Serve's high-throughput mode (Ray's "Enable High Throughput on Ray Serve"); read when Ray starts
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# Threads per replica, set explicitly: torch and ONNX Runtime take them as arguments; every other OpenMP
# user in a replica (faiss) reads OMP_NUM_THREADS, which Ray sets for no replica with a fractional CPU,
# so without it each would start a team the size of the machine beside them (docs/serving.md).
REPLICA_THREADS = int(os.environ.get("TMR_SERVE_THREADS", "1"))
# Replicas' niceness, set explicitly (runtime_env RAY_worker_niceness, as Ray's job manager sets its
# supervisor's): Ray's default for workers, 15, which measured faster at one query at a time than 0 (short
# queries 14.2-14.6 against 17.7-17.8 ms p50, with 0 a few % more QPS at 32 concurrent: docs/serving.md).
REPLICA_NICENESS = os.environ.get("TMR_SERVE_NICENESS", "15")
REPLICA_ENV = {"OMP_NUM_THREADS": str(REPLICA_THREADS), "TMR_SERVE_THREADS": str(REPLICA_THREADS),
               "RAY_worker_niceness": REPLICA_NICENESS}


def replica_options(num_cpus: float) -> dict:
    """A deployment's ray_actor_options: its CPU share and the thread settings above."""
    return {"num_cpus": num_cpus, "runtime_env": {"env_vars": REPLICA_ENV}}


MAX_BODY_BYTES = 64 * 1024
MAX_LOOKED_AT = 20_000  # candidates a filtered search may examine before it reports how many passed
# A search alone in the ingress runs its short text's forward and its search (up to this k) in the event loop's
# thread: a hop to a worker thread and back wakes a sleeping core each way, ~0.1-0.2 ms on these VMs, the part
# of Serve's overhead over the bare library that lay inside the handler (docs/serving.md). Under load (another
# search in flight) both go to worker threads as before, so that the loop stays free for the others.
ALONE_MAX_K = 100
WARM_UP_DESCRIPTION = ("The molecule is a monocarboxylic acid that is propanoic acid in which one of the hydrogens at "
                       "position 2 is substituted by a 4-(2-methylpropyl)phenyl group. It has a role as a "
                       "non-steroidal anti-inflammatory drug, a cyclooxygenase 2 inhibitor and a drug allergen.")


class QueryEncoder:
    """The model's two encoders in this process, warmed up: texts through the backbone on ONNX
    Runtime (exported on first deploy, cached beside the model; torch without onnxruntime)."""

    def __init__(self, model_dir: str):
        import torch

        from tmr.fast_text import text_encoder_for
        from tmr.model import from_pretrained

        torch.set_num_threads(REPLICA_THREADS)
        self.model = from_pretrained(model_dir)
        self.text, self.engine = text_encoder_for(self.model, model_dir, REPLICA_THREADS)
        # warm up before the replica reports healthy: the first calls pay for lazy init and kernel selection,
        # at a short and a ChEBI-length query (and the batch shapes concurrent queries make)
        for texts in (["The molecule is a monocarboxylic acid."], [WARM_UP_DESCRIPTION] * 4):
            for _ in range(3):
                self.text(texts)
        for _ in range(3):
            self.model.encode_molecule(["CC(C)Cc1ccc(cc1)C(C)C(=O)O"])

    def molecules(self, smiles: list[str]):
        return self.model.encode_molecule(smiles)


# max_ongoing_requests above the batch size, or requests wait in the router instead of in a batch
@serve.deployment(ray_actor_options=replica_options(0.5), max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
class Encoder:
    """The encoders as a deployment: concurrent requests are batched (`@serve.batch`). Searches encode
    in the ingress unless `encode_in_ingress=false`; /embed's lists come here."""

    def __init__(self, model_dir: str):
        self.encoders = QueryEncoder(model_dir)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.encoders.text(texts).numpy())

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def embed_smiles(self, smiles: list[str]) -> list[np.ndarray]:
        return list(self.encoders.molecules(smiles).numpy())  # parsed by the ingress first: no bad input here

    async def text(self, text: str) -> np.ndarray:
        return await self.embed_texts(text)

    async def molecule(self, smiles: str) -> np.ndarray:
        return await self.embed_smiles(smiles)

    def engine(self) -> str:
        return self.encoders.engine


class ShardIndex:
    """One shard (rows shard::num_shards) of an index directory, warmed up: searched in the ingress
    for a single-shard library, or behind an IndexShard deployment."""

    def __init__(self, index_dir: str, shard: int = 0, num_shards: int = 1):
        from tmr.index import RetrievalIndex

        self.index = RetrievalIndex(index_dir, shard, num_shards)
        self.search(np.zeros(self.index.manifest["dim"], dtype=np.float32), 10)  # warm up (pages the index in)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """The top k found (fewer when the approximate index finds fewer: a wide filtered search)."""
        scores, rows = self.index.search(query[None, :], k)
        found = rows[0] >= 0
        scores, rows = scores[0][found], rows[0][found]
        return scores, rows, self.index.records(rows)

    def placement(self) -> dict:
        import ray

        return {"rows": len(self.index), "node": ray.get_runtime_context().get_node_id()}


@serve.deployment(ray_actor_options=replica_options(0.25), max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16})
class IndexShard(ShardIndex):
    """A shard as its own deployment: a library split over N shards (or `search_in_ingress=false`)."""

    def check_health(self) -> None:
        if len(self.index) == 0:
            raise RuntimeError("empty shard")


api = FastAPI(title="tmr retrieval", description="text <-> molecule retrieval (Song et al. 2024)")


api.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)


async def idempotent(method, *args):
    """A search is idempotent: when the replica serving it dies mid-call, ask once more (Serve
    routes the retry to a live replica) instead of showing the client a 500."""
    from ray.exceptions import RayActorError

    try:
        return await method.remote(*args)
    except RayActorError:
        return await method.remote(*args)


@serve.deployment(ray_actor_options=replica_options(0.25), max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    def __init__(self, encoder, molecule_shards: list, text_shards: list, info: dict, model_dir: str | None = None,
                 local_indexes: dict | None = None, encode_workers: int = 2):
        from tmr.chem import depict_svg, properties

        self.encoder, self.molecule_shards, self.text_shards, self.info_ = encoder, molecule_shards, text_shards, info
        # a single-shard library searched here, in a worker thread (faiss releases the GIL): no hop to a
        # shard replica (measured: docs/serving.md)
        if local_indexes:
            self.molecule_shards = [ShardIndex(local_indexes["molecules"])]
            self.text_shards = [ShardIndex(local_indexes["texts"])] if local_indexes.get("texts") else []
        self.query_cache = QueryCache()
        self.searches_in_flight = 0  # searches (text, structure, describe, export) this replica is answering now
        # a search's one query encoded here, in a worker thread (ONNX Runtime and torch release the GIL):
        # no hop to the Encoder and no batch window (measured: docs/serving.md)
        self.local = QueryEncoder(model_dir) if model_dir else None
        # concurrent text queries share forwards, with no batch window (encode_workers=0: one query per call)
        self.text_batcher = QueryBatcher(self.local.text, encode_workers) if self.local and encode_workers else None
        depict_svg("c1ccccc1O", "c1ccccc1"), properties("c1ccccc1O")  # warm up RDKit's drawing and descriptors

    async def _encode(self, kind: str, value: str) -> np.ndarray:
        if self.local is None:
            return await idempotent(self.encoder.text if kind == "text" else self.encoder.molecule, value)
        if kind == "text" and self.text_batcher is not None:
            if self._alone() and len(value) <= self.text_batcher.max_chars:
                return self.text_batcher.encode_here(value)  # alone, and short: no hop
            return await self.text_batcher(value)
        # one query per call, in the default executor's threads: concurrent queries run side by side on the cores
        encode = self.local.text if kind == "text" else self.local.molecules
        return await asyncio.to_thread(lambda: encode([value])[0].numpy())

    async def _search(self, shards: list, vector: np.ndarray, k: int) -> list[dict]:
        from tmr.index import merge_top_k

        def ask(shard):
            if isinstance(shard, ShardIndex):
                return asyncio.to_thread(shard.search, vector, k)
            return idempotent(shard.search, vector, k)

        if len(shards) == 1 and isinstance(shards[0], ShardIndex) and self._alone() and k <= ALONE_MAX_K:
            answers = [shards[0].search(vector, k)]  # alone: in this thread, no hop
        else:
            answers = await asyncio.gather(*[ask(shard) for shard in shards])
        if len(answers) == 1:  # one shard's answer is already the top k, in order
            scores, _, records = answers[0]
            return [{"rank": i + 1, "score": float(score), **record}
                    for i, (score, record) in enumerate(zip(scores.tolist(), records))]
        scores, rows = merge_top_k([(s[None, :], r[None, :]) for s, r, _ in answers], k)
        by_row = {int(r): rec for _, rs, recs in answers for r, rec in zip(rs, recs)}
        return [{"rank": i + 1, "score": float(score), **by_row[int(row)]}
                for i, (score, row) in enumerate(zip(scores[0], rows[0]))]

    async def _molecules(self, vector: np.ndarray, k: int, filters: Filters | None, timings: Timings,
                         query_smiles: str | None = None) -> dict:
        """Top k molecules passing the filters (looking further down the ranking, up to
        MAX_LOOKED_AT, until k pass), each with its properties, link and depiction."""
        from tmr.chem import tanimoto

        wanted = filters.build() if filters else None
        answer: dict = {}
        if wanted is None or not wanted.active:
            with timings.stage("search"):
                results = await self._search(self.molecule_shards, vector, k)
        else:
            total, looked_at = self.info_["molecules"]["count"], min(max(4 * k, 100), MAX_LOOKED_AT)
            verdicts: dict[str, bool] = {}  # by SMILES: a wider search re-checks none of the earlier candidates
            while True:
                with timings.stage("search"):
                    candidates = await self._search(self.molecule_shards, vector, min(looked_at, total))
                with timings.stage("filter"):
                    unseen = [c for c in candidates if c["smiles"] not in verdicts]
                    verdicts.update(await asyncio.to_thread(
                        lambda: {c["smiles"]: wanted.accepts(c["smiles"], c.get("properties")) for c in unseen}))
                    passed = [c for c in candidates if verdicts[c["smiles"]]]
                if len(passed) >= k or looked_at >= min(total, MAX_LOOKED_AT):
                    break
                looked_at = min(looked_at * 4, MAX_LOOKED_AT)
            results = [{**result, "rank": i + 1} for i, result in enumerate(passed[:k])]
            answer["filter"] = {"looked_at": len(candidates), "passed": len(passed)}

        def decorate(result: dict) -> dict:
            link = self.info_["molecules"].get("id_url")
            query = f"&query={quote(query_smiles, safe='')}" if query_smiles else ""
            extra = {"url": link.format(id=result["id"]) if link else None,
                     "depiction": f"depict?smiles={quote(result['smiles'], safe='')}{query}"}
            if query_smiles:
                extra["tanimoto"] = tanimoto(query_smiles, result["smiles"])
            return {**result, **extra}

        with timings.stage("decorate"):
            if query_smiles is None:  # links only (~0.03 ms a result): a thread hop would cost more
                return {**answer, "results": [decorate(r) for r in results]}
            return {**answer, "results": await asyncio.to_thread(lambda: [decorate(r) for r in results])}  # Tanimoto

    def _alone(self) -> bool:
        """No other search in flight here: this one may hold the event loop (ALONE_MAX_K)."""
        return self.searches_in_flight == 1

    async def _answer(self, mode: str, query, timings: Timings | None = None) -> dict:
        self.searches_in_flight += 1
        try:
            return await self._answer_one(mode, query, timings)
        finally:
            self.searches_in_flight -= 1

    async def _answer_one(self, mode: str, query, timings: Timings | None) -> dict:
        timings = timings or Timings()
        timings.activate()  # this request's task (and the encoding it starts) reports into it
        if mode == "text":
            with timings.stage("encode"):
                vector = await self.query_cache.get(("text", query.text), lambda: self._encode("text", query.text))
            return {"query": query.text, **await self._molecules(vector, query.k, query.filters, timings)}
        with timings.stage("parse"):
            parsed = query_structure(query)
        if mode == "describe" and not self.text_shards:
            raise HTTPException(status_code=404, detail="no text corpus is deployed")
        smiles = parsed.canonical_smiles
        with timings.stage("encode"):
            vector = await self.query_cache.get(("molecule", smiles), lambda: self._encode("molecule", smiles))
        if mode == "describe":
            with timings.stage("search"):
                return {"query": smiles, "results": await self._search(self.text_shards, vector, query.k)}
        return {"query": smiles, **await self._molecules(vector, query.k, query.filters, timings, smiles)}

    async def _timed(self, mode: str, query) -> JSONResponse:
        timings = Timings()
        answer = await self._answer(mode, query, timings)
        # the answer is plain JSON types already: returned as a dict, FastAPI's jsonable_encoder would walk
        # it again first (~0.5 ms for a page of 10 results, 10x json.dumps itself)
        return JSONResponse(answer, headers={"Server-Timing": timings.header()})

    @api.post("/search/text")
    async def search_text(self, query: TextQuery) -> JSONResponse:
        return await self._timed("text", query)

    @api.post("/search/molecule")
    async def search_molecule(self, query: MoleculeQuery) -> JSONResponse:
        return await self._timed("molecule", query)

    @api.post("/describe")
    async def describe(self, query: MoleculeQuery) -> JSONResponse:
        return await self._timed("describe", query)

    @api.get("/export")
    async def export(self, request: Request, format: str = "csv") -> Response:
        """The page's search (its URL parameters) as a CSV or SD file."""
        from tmr.chem import results_csv, results_sdf

        if format not in ("csv", "sdf"):
            raise HTTPException(status_code=422, detail=f"format {format!r}; use csv or sdf")
        mode, query = query_from_params(dict(request.query_params))
        if mode == "describe" and format == "sdf":
            raise HTTPException(status_code=422, detail="descriptions export as csv only")
        results = (await self._answer(mode, query))["results"]
        body = results_csv(results) if format == "csv" else await asyncio.to_thread(results_sdf, results)
        return Response(body, media_type="text/csv" if format == "csv" else "chemical/x-mdl-sdfile",
                        headers={"Content-Disposition": f'attachment; filename="tmr_{mode}_results.{format}"'})

    @api.get("/depict")
    async def depict(self, smiles: str, query: str | None = None) -> Response:
        """A molecule as SVG (cached); with `query`, the substructure it shares with it highlighted."""
        from tmr.chem import depict_svg

        try:
            svg = await asyncio.to_thread(depict_svg, smiles, query or None)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from error
        return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @api.get("/static/{name}")
    async def static(self, name: str) -> Response:
        path = static_file(name)
        return Response(path.read_bytes(), media_type=STATIC_TYPES[path.suffix],
                        headers={"Cache-Control": "public, max-age=3600"})

    @api.post("/embed")
    async def embed(self, request: EmbedRequest) -> dict:
        if not request.texts and not request.smiles:
            raise HTTPException(status_code=422, detail="give texts or smiles")
        for text in request.texts:
            try:
                TextQuery(text=text)  # the same rules as a search
            except ValidationError as error:
                raise HTTPException(status_code=422, detail=error.errors(include_url=False, include_context=False)) from error
        canonical = [parse_or_422(s).canonical_smiles for s in request.smiles]
        texts = await asyncio.gather(*[self.encoder.text.remote(t) for t in request.texts])
        molecules = await asyncio.gather(*[self.encoder.molecule.remote(s) for s in canonical])
        return {"texts": [v.tolist() for v in texts], "smiles": [v.tolist() for v in molecules]}

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/info")
    async def info(self) -> dict:
        """The deployment: model, libraries, where each molecule shard runs (rows, Ray node), this replica's threads."""
        import torch

        in_ingress = [isinstance(shard, ShardIndex) for shard in self.molecule_shards]
        shards = await asyncio.gather(*[asyncio.to_thread(shard.placement) if local else shard.placement.remote()
                                        for shard, local in zip(self.molecule_shards, in_ingress)])
        return {**self.info_, "molecule_shards": shards, "query_cache": self.query_cache.stats(),
                "text_engine": self.local.engine if self.local else await self.encoder.engine.remote(),
                "encode_in_ingress": self.local is not None, "search_in_ingress": all(in_ingress),
                "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads()},
                "niceness": os.nice(0),
                "text_batches": self.text_batcher.stats() if self.text_batcher else None}


def build_app(args: dict):
    """`serve run serve.app:app model_dir=... molecules=... [texts=...] [shards=N] [encoder_max_replicas=N]
    [downscale_delay_s=S] [encode_in_ingress=false] [search_in_ingress=false] [encode_workers=N]`."""
    import json
    import logging

    missing = [f"{name}={value}" for name, value in SERVE_ENV.items() if os.environ.get(name) != value]
    if missing:
        logging.getLogger("tmr.serve").warning(
            "Ray Serve runs without its high-throughput mode: requests go through its Python HTTP proxy "
            "(~10x the per-request overhead, docs/serving.md); start Ray with %s set", " ".join(missing))
    model_dir = args.get("model_dir") or os.environ.get("TMR_MODEL", "runs/cpu/best")
    molecules = args.get("molecules") or os.environ.get("TMR_MOLECULES", "runs/index/molecules")
    texts = args.get("texts") or os.environ.get("TMR_TEXTS")
    shards = int(args.get("shards", 1))
    for path in [model_dir, molecules] + ([texts] if texts else []):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} does not exist; train a model (jobs/train.py) and index a library (jobs/index.py)")
    # Replicas beyond the machine's cores only contend for them: bound the autoscaler by `encoder_max_replicas`.
    encoder = Encoder.options(autoscaling_config={
        "min_replicas": 1, "max_replicas": int(args.get("encoder_max_replicas", 4)), "target_ongoing_requests": 8,
        "downscale_delay_s": float(args.get("downscale_delay_s", 600)),
    }).bind(str(Path(model_dir).resolve()))
    def flag(name: str) -> bool:
        return str(args.get(name, "true")).lower() in ("1", "true", "yes")

    # one shard: searched in the ingress unless search_in_ingress=false; N shards: N deployments searched in parallel
    local = shards == 1 and flag("search_in_ingress")
    local_indexes = {"molecules": str(Path(molecules).resolve()), "texts": str(Path(texts).resolve()) if texts else None}
    molecule_shards = [] if local else [
        IndexShard.options(name=f"MoleculeShard{i}").bind(str(Path(molecules).resolve()), i, shards) for i in range(shards)]
    text_shards = [IndexShard.options(name=f"TextShard{i}").bind(str(Path(texts).resolve()), i, shards)
                   for i in range(shards)] if texts and not local else []
    manifest = json.loads((Path(molecules) / "manifest.json").read_text())
    info = {"model": str(Path(model_dir).resolve()), "model_fingerprint": manifest["model_fingerprint"],
            "molecules": {"path": str(Path(molecules).resolve()), "count": manifest["count"], "index": manifest["index"],
                          "id_url": manifest.get("id_url")},
            "texts": json.loads((Path(texts) / "manifest.json").read_text())["count"] if texts else 0,
            "shards": shards, "dim": manifest["dim"]}
    return Ingress.bind(encoder, molecule_shards, text_shards, info,
                        str(Path(model_dir).resolve()) if flag("encode_in_ingress") else None,
                        local_indexes if local else None, int(args.get("encode_workers", 2)))


app = build_app
