"""Ray Serve app: a trained tmr model as autoscaled retrieval replicas behind HTTP.

    Encoder (dynamic batching: texts, SMILES)  ─┐
    MoleculeShard x N (faiss over 1/N of a library) ├─ Ingress (FastAPI): merges top-k across shards
    TextShard x N (texts, for /describe)        ─┘

    serve run serve.app:app model_dir=runs/cpu/best molecules=runs/index/molecules texts=runs/index/texts
    serve deploy serve/config.yaml

Endpoints: POST /search/text, /search/molecule, /describe, /embed; GET /health, /info. Client
mistakes are 4xx with the reason (bad SMILES 422 naming it, empty or over-long text 422, k outside
1..1000 422, oversized body 413); never a 500.
"""


import asyncio
import os
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, field_validator
from ray import serve

MAX_TEXT_CHARS = 4000
MAX_BODY_BYTES = 64 * 1024
MAX_K = 1000


class TextQuery(BaseModel):
    text: str = Field(..., description="a description of the molecules wanted")
    k: int = Field(10, ge=1, le=MAX_K)

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is empty")
        if len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"text is {len(value)} characters; at most {MAX_TEXT_CHARS}")
        return value


class MoleculeQuery(BaseModel):
    smiles: str = Field(..., min_length=1, max_length=2000)
    k: int = Field(10, ge=1, le=MAX_K)


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

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        scores, rows = self.index.search(query[None, :], k)
        return scores[0], rows[0], [self.index.record(r) for r in rows[0]]

    def size(self) -> int:
        return len(self.index)

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


def parse_or_422(smiles: str):
    """Parsed molecule, or a 422 naming the SMILES (also for atoms the featuriser cannot encode)."""
    from tmr.data.featurize import InvalidMolecule, featurize, parse_smiles

    try:
        featurize(smiles)
        return parse_smiles(smiles)
    except InvalidMolecule as error:
        raise HTTPException(status_code=422, detail=f"invalid SMILES {smiles!r}: {error}") from error


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    def __init__(self, encoder, molecule_shards: list, text_shards: list, info: dict):
        self.encoder, self.molecule_shards, self.text_shards, self.info_ = encoder, molecule_shards, text_shards, info

    async def _search(self, shards: list, vector: np.ndarray, k: int) -> list[dict]:
        from tmr.index import merge_top_k

        answers = await asyncio.gather(*[shard.search.remote(vector, k) for shard in shards])
        scores, rows = merge_top_k([(s[None, :], r[None, :]) for s, r, _ in answers], k)
        records = {int(r): rec for _, rs, recs in answers for r, rec in zip(rs, recs)}
        return [{"rank": i + 1, "score": float(score), **records[int(row)]}
                for i, (score, row) in enumerate(zip(scores[0], rows[0]))]

    @api.post("/search/text")
    async def search_text(self, query: TextQuery) -> dict:
        vector = await self.encoder.text.remote(query.text)
        return {"query": query.text, "results": await self._search(self.molecule_shards, vector, query.k)}

    @api.post("/search/molecule")
    async def search_molecule(self, query: MoleculeQuery) -> dict:
        from rdkit import DataStructs
        from rdkit.Chem import MolFromSmiles, rdFingerprintGenerator

        parsed = parse_or_422(query.smiles)
        vector = await self.encoder.molecule.remote(parsed.canonical_smiles)
        results = await self._search(self.molecule_shards, vector, query.k)
        generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
        reference = generator.GetFingerprint(parsed.mol)
        for result in results:
            mol = MolFromSmiles(result["smiles"])
            result["tanimoto"] = DataStructs.TanimotoSimilarity(reference, generator.GetFingerprint(mol)) if mol else None
        return {"query": parsed.canonical_smiles, "results": results}

    @api.post("/describe")
    async def describe(self, query: MoleculeQuery) -> dict:
        if not self.text_shards:
            raise HTTPException(status_code=404, detail="no text corpus is deployed")
        parsed = parse_or_422(query.smiles)
        vector = await self.encoder.molecule.remote(parsed.canonical_smiles)
        return {"query": parsed.canonical_smiles, "results": await self._search(self.text_shards, vector, query.k)}

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
        return self.info_


def build_app(args: dict):
    """`serve run serve.app:app model_dir=... molecules=... [texts=...] [shards=N] [encoder_max_replicas=N]`."""
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
    }).bind(str(Path(model_dir).resolve()))
    molecule_shards = [IndexShard.options(name=f"MoleculeShard{i}").bind(str(Path(molecules).resolve()), i, shards)
                       for i in range(shards)]
    text_shards = [IndexShard.options(name=f"TextShard{i}").bind(str(Path(texts).resolve()), i, shards)
                   for i in range(shards)] if texts else []
    manifest = json.loads((Path(molecules) / "manifest.json").read_text())
    info = {"model": str(Path(model_dir).resolve()), "model_fingerprint": manifest["model_fingerprint"],
            "molecules": {"path": str(Path(molecules).resolve()), "count": manifest["count"], "index": manifest["index"]},
            "texts": json.loads((Path(texts) / "manifest.json").read_text())["count"] if texts else 0,
            "shards": shards, "dim": manifest["dim"]}
    return Ingress.bind(encoder, molecule_shards, text_shards, info)


app = build_app
