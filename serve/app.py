"""Ray Serve app: a trained tmr model as autoscaled retrieval replicas behind HTTP.

    Encoder (dynamic batching: texts, SMILES)  ─┐
    MoleculeShard x N (faiss over 1/N of a library) ├─ Ingress (FastAPI): merges top-k across shards
    TextShard x N (texts, for /describe)        ─┘

    serve run serve.app:app model_dir=runs/cpu/best molecules=runs/index/molecules texts=runs/index/texts
    serve deploy serve/config.yaml

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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve

from tmr.chem import PROPERTIES, MoleculeFilter

MAX_TEXT_CHARS = 4000
MAX_BODY_BYTES = 64 * 1024
MAX_K = 1000
MAX_LOOKED_AT = 20_000  # candidates a filtered search may examine before it reports how many passed
STATIC = Path(__file__).with_name("static")
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
Bounds = tuple[float | None, float | None]


class Filters(BaseModel):
    """Property ranges [min, max] (inclusive, null = open), Lipinski pass/fail, a SMARTS substructure."""

    model_config = ConfigDict(extra="forbid")
    mw: Bounds | None = None
    clogp: Bounds | None = None
    hbd: Bounds | None = None
    hba: Bounds | None = None
    tpsa: Bounds | None = None
    rotatable_bonds: Bounds | None = None
    lipinski: bool | None = None
    smarts: str | None = Field(None, max_length=1000)

    def build(self) -> MoleculeFilter:
        from tmr.chem import InvalidFilter

        ranges = {key: value for key, value in self.model_dump(exclude={"lipinski", "smarts"}).items() if value}
        try:
            return MoleculeFilter(ranges, self.smarts or None, self.lipinski)
        except InvalidFilter as error:
            raise HTTPException(status_code=422, detail=str(error)) from error


class TextQuery(BaseModel):
    text: str = Field(..., description="a description of the molecules wanted")
    k: int = Field(10, ge=1, le=MAX_K)
    filters: Filters | None = None

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is empty")
        if len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"text is {len(value)} characters; at most {MAX_TEXT_CHARS}")
        return value


class MoleculeQuery(BaseModel):
    smiles: str | None = Field(None, min_length=1, max_length=2000)
    molfile: str | None = Field(None, description="a .mol or .sdf text (its first record) instead of SMILES")
    k: int = Field(10, ge=1, le=MAX_K)
    filters: Filters | None = None

    @model_validator(mode="after")
    def _one_structure(self):
        if (self.smiles is None) == (self.molfile is None):
            raise ValueError("give exactly one of smiles or molfile")
        return self


class EmbedRequest(BaseModel):
    texts: list[str] = Field(default_factory=list, max_length=256)
    smiles: list[str] = Field(default_factory=list, max_length=256)


# max_ongoing_requests above the batch size, or requests wait in the router instead of in a batch
@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
class Encoder:
    """The model's two encoders; concurrent requests are batched (`@serve.batch`)."""

    def __init__(self, model_dir: str):
        import torch

        from tmr.model import from_pretrained

        torch.set_num_threads(int(os.environ.get("TMR_SERVE_THREADS", "1")))
        self.model = from_pretrained(model_dir)
        # warm up before the replica reports healthy: the first calls pay for lazy init and kernel selection
        for _ in range(3):
            self.model.encode_text(["The molecule is a monocarboxylic acid."])
            self.model.encode_molecule(["CC(C)Cc1ccc(cc1)C(C)C(=O)O"])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.model.encode_text(texts).numpy())

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def embed_smiles(self, smiles: list[str]) -> list[np.ndarray]:
        return list(self.model.encode_molecule(smiles).numpy())  # parsed by the ingress first: no bad input here

    async def text(self, text: str) -> np.ndarray:
        return await self.embed_texts(text)

    async def molecule(self, smiles: str) -> np.ndarray:
        return await self.embed_smiles(smiles)

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16})
class IndexShard:
    """One shard (rows shard::num_shards) of an index directory."""

    def __init__(self, index_dir: str, shard: int, num_shards: int):
        from tmr.index import RetrievalIndex

        self.index = RetrievalIndex(index_dir, shard, num_shards)
        self.search(np.zeros(self.index.manifest["dim"], dtype=np.float32), 10)  # warm up (pages the index in)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        scores, rows = self.index.search(query[None, :], k)
        return scores[0], rows[0], [self.index.record(r) for r in rows[0]]

    def size(self) -> int:
        return len(self.index)

    def placement(self) -> dict:
        import ray

        return {"rows": len(self.index), "node": ray.get_runtime_context().get_node_id()}

    def check_health(self) -> None:
        if len(self.index) == 0:
            raise RuntimeError("empty shard")


api = FastAPI(title="tmr retrieval", description="text <-> molecule retrieval (Song et al. 2024)")


@api.middleware("http")
async def limit_body(request: Request, call_next):
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        return JSONResponse({"detail": f"bad content-length {length!r}"}, status_code=400)
    if length is not None and int(length) > MAX_BODY_BYTES:
        return JSONResponse({"detail": f"body of {length} bytes; at most {MAX_BODY_BYTES}"}, status_code=413)
    return await call_next(request)


async def idempotent(method, *args):
    """A search is idempotent: when the replica serving it dies mid-call, ask once more (Serve
    routes the retry to a live replica) instead of showing the client a 500."""
    from ray.exceptions import RayActorError

    try:
        return await method.remote(*args)
    except RayActorError:
        return await method.remote(*args)


def parse_or_422(smiles: str):
    """Parsed molecule, or a 422 naming the SMILES (also for atoms the featuriser cannot encode)."""
    from tmr.data.featurize import InvalidMolecule, featurize, parse_smiles

    try:
        featurize(smiles)
        return parse_smiles(smiles)
    except InvalidMolecule as error:
        raise HTTPException(status_code=422, detail=f"invalid SMILES {smiles!r}: {error}") from error


def query_structure(query: MoleculeQuery):
    """The query's molecule (from SMILES or an uploaded .mol/.sdf), parsed, or a 422."""
    if query.molfile is None:
        return parse_or_422(query.smiles)
    from tmr.chem import molfile_to_smiles

    try:
        return parse_or_422(molfile_to_smiles(query.molfile))
    except ValueError as error:
        raise HTTPException(status_code=422, detail=str(error)) from error


def query_from_params(params: dict) -> tuple[str, TextQuery | MoleculeQuery]:
    """The page's URL (mode, q, k, mw_min, mw_max, ..., lipinski, smarts) as an API query, or a 422."""
    mode = params.get("mode", "text")
    if mode not in ("text", "molecule", "describe"):
        raise HTTPException(status_code=422, detail=f"mode {mode!r}; use text, molecule or describe")
    filters: dict = {}
    for key in PROPERTIES:
        low, high = params.get(f"{key}_min") or None, params.get(f"{key}_max") or None
        if low is not None or high is not None:
            filters[key] = (low, high)
    if params.get("lipinski") in ("pass", "fail"):
        filters["lipinski"] = params["lipinski"] == "pass"
    if params.get("smarts"):
        filters["smarts"] = params["smarts"]
    body = {"k": params.get("k", 10), "filters": filters or None}
    try:
        if mode == "text":
            return mode, TextQuery(text=params.get("q", ""), **body)
        return mode, MoleculeQuery(smiles=params.get("q") or None, **body)
    except ValidationError as error:
        raise HTTPException(status_code=422, detail=error.errors(include_url=False, include_context=False)) from error


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    def __init__(self, encoder, molecule_shards: list, text_shards: list, info: dict):
        from tmr.chem import depict_svg, properties

        self.encoder, self.molecule_shards, self.text_shards, self.info_ = encoder, molecule_shards, text_shards, info
        depict_svg("c1ccccc1O", "c1ccccc1"), properties("c1ccccc1O")  # warm up RDKit's drawing and descriptors

    async def _search(self, shards: list, vector: np.ndarray, k: int) -> list[dict]:
        from tmr.index import merge_top_k

        answers = await asyncio.gather(*[idempotent(shard.search, vector, k) for shard in shards])
        scores, rows = merge_top_k([(s[None, :], r[None, :]) for s, r, _ in answers], k)
        records = {int(r): rec for _, rs, recs in answers for r, rec in zip(rs, recs)}
        return [{"rank": i + 1, "score": float(score), **records[int(row)]}
                for i, (score, row) in enumerate(zip(scores[0], rows[0]))]

    async def _molecules(self, vector: np.ndarray, k: int, filters: Filters | None, query_smiles: str | None = None) -> dict:
        """Top k molecules passing the filters (looking further down the ranking, up to
        MAX_LOOKED_AT, until k pass), each with its properties, link and depiction."""
        from tmr.chem import inchikey, properties, tanimoto

        wanted = filters.build() if filters else None
        answer: dict = {}
        if wanted is None or not wanted.active:
            results = await self._search(self.molecule_shards, vector, k)
        else:
            total, looked_at = self.info_["molecules"]["count"], min(max(4 * k, 100), MAX_LOOKED_AT)
            while True:
                candidates = await self._search(self.molecule_shards, vector, min(looked_at, total))
                passed = await asyncio.to_thread(lambda: [c for c in candidates if wanted.accepts(c["smiles"])])
                if len(passed) >= k or looked_at >= min(total, MAX_LOOKED_AT):
                    break
                looked_at = min(looked_at * 4, MAX_LOOKED_AT)
            results = [{**result, "rank": i + 1} for i, result in enumerate(passed[:k])]
            answer["filter"] = {"looked_at": len(candidates), "passed": len(passed)}

        def decorate(result: dict) -> dict:
            link = self.info_["molecules"].get("id_url")
            query = f"&query={quote(query_smiles, safe='')}" if query_smiles else ""
            extra = {"inchikey": inchikey(result["smiles"]), "properties": properties(result["smiles"]),
                     "url": link.format(id=result["id"]) if link else None,
                     "depiction": f"depict?smiles={quote(result['smiles'], safe='')}{query}"}
            if query_smiles:
                extra["tanimoto"] = tanimoto(query_smiles, result["smiles"])
            return {**result, **extra}

        return {**answer, "results": await asyncio.to_thread(lambda: [decorate(r) for r in results])}

    async def _answer(self, mode: str, query) -> dict:
        if mode == "text":
            vector = await idempotent(self.encoder.text, query.text)
            return {"query": query.text, **await self._molecules(vector, query.k, query.filters)}
        parsed = query_structure(query)
        if mode == "describe" and not self.text_shards:
            raise HTTPException(status_code=404, detail="no text corpus is deployed")
        vector = await idempotent(self.encoder.molecule, parsed.canonical_smiles)
        if mode == "describe":
            return {"query": parsed.canonical_smiles, "results": await self._search(self.text_shards, vector, query.k)}
        return {"query": parsed.canonical_smiles,
                **await self._molecules(vector, query.k, query.filters, parsed.canonical_smiles)}

    @api.post("/search/text")
    async def search_text(self, query: TextQuery) -> dict:
        return await self._answer("text", query)

    @api.post("/search/molecule")
    async def search_molecule(self, query: MoleculeQuery) -> dict:
        return await self._answer("molecule", query)

    @api.post("/describe")
    async def describe(self, query: MoleculeQuery) -> dict:
        return await self._answer("describe", query)

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
        path = STATIC / name
        if path.parent != STATIC or path.suffix not in STATIC_TYPES or not path.is_file():
            raise HTTPException(status_code=404, detail=f"no static file {name!r}")
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
        """The deployment: model, libraries, and where each molecule shard runs (rows, Ray node)."""
        shards = await asyncio.gather(*[shard.placement.remote() for shard in self.molecule_shards])
        return {**self.info_, "molecule_shards": shards}


def build_app(args: dict):
    """`serve run serve.app:app model_dir=... molecules=... [texts=...] [shards=N] [encoder_max_replicas=N]
    [downscale_delay_s=S]`."""
    import json

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
    molecule_shards = [IndexShard.options(name=f"MoleculeShard{i}").bind(str(Path(molecules).resolve()), i, shards)
                       for i in range(shards)]
    text_shards = [IndexShard.options(name=f"TextShard{i}").bind(str(Path(texts).resolve()), i, shards)
                   for i in range(shards)] if texts else []
    manifest = json.loads((Path(molecules) / "manifest.json").read_text())
    info = {"model": str(Path(model_dir).resolve()), "model_fingerprint": manifest["model_fingerprint"],
            "molecules": {"path": str(Path(molecules).resolve()), "count": manifest["count"], "index": manifest["index"],
                          "id_url": manifest.get("id_url")},
            "texts": json.loads((Path(texts) / "manifest.json").read_text())["count"] if texts else 0,
            "shards": shards, "dim": manifest["dim"]}
    return Ingress.bind(encoder, molecule_shards, text_shards, info)


app = build_app
