"""What a request may be: the request bodies and their limits, a query's molecule (SMILES or an
uploaded .mol/.sdf, parsed or a 422 naming it), the page's URL as a query, the query-embedding
cache, the batcher that lets concurrent queries share a forward, a request's Server-Timing and the
page's static files. No Ray here: serve/app.py's deployments use these.
"""

import asyncio
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tmr.chem import PROPERTIES, MoleculeFilter

MAX_TEXT_CHARS = 4000
MAX_K = 1000
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
def parse_or_422(smiles: str):
    """Parsed molecule, or a 422 naming the SMILES (also for atoms the featuriser cannot encode, and
    for a molecule over tmr.chem.MAX_ATOMS heavy atoms, naming the limit)."""
    from tmr.chem import TooLarge, check_size
    from tmr.data.featurize import InvalidMolecule, featurize, parse_smiles

    try:
        parsed = parse_smiles(smiles)
        check_size(parsed.mol)
        featurize(smiles)
        return parsed
    except (InvalidMolecule, TooLarge) as error:
        raise HTTPException(status_code=422, detail=f"invalid SMILES {smiles[:200]!r}: {error}") from error


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


class QueryCache:
    """Query embeddings by query (text, or canonical SMILES), least recently used out first: a page asks
    the same query again and again (paging, filters, export), and a repeat then skips the encoder hop."""

    def __init__(self, size: int = 4096):
        self.size, self.vectors, self.hits, self.misses, self.joined = size, OrderedDict(), 0, 0, 0
        self.pending: dict[tuple[str, str], asyncio.Future] = {}  # misses being encoded now

    async def get(self, key: tuple[str, str], compute) -> np.ndarray:
        vector = self.vectors.get(key)
        if vector is not None:
            self.hits += 1
            self.vectors.move_to_end(key)
            return vector
        if key in self.pending:  # the same query arrived while its first copy is encoded: wait for that one
            self.joined += 1
            return await asyncio.shield(self.pending[key])
        self.misses += 1
        task = self.pending[key] = asyncio.ensure_future(compute())
        task.add_done_callback(lambda done: self._finished(key, done))
        # shielded: a client that hangs up does not cancel the encoding others may be waiting for
        return await asyncio.shield(task)

    def _finished(self, key: tuple[str, str], task: asyncio.Future) -> None:
        self.pending.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return  # not cached: the next request tries again
        self.vectors[key] = task.result()
        if len(self.vectors) > self.size:
            self.vectors.popitem(last=False)

    def stats(self) -> dict:
        return {"size": len(self.vectors), "capacity": self.size, "hits": self.hits, "misses": self.misses,
                "joined": self.joined}


class QueryBatcher:
    """Concurrent queries through shared forwards, with no batch window: `workers` threads each take
    the oldest waiting query and, with it, every other waiting one of a similar length (up to
    `max_batch`). A lone query runs at once, as it would alone; under load the queries that arrived
    during a forward share the next one: a short text costs the encoder ~2.5x less in a batch of 32
    than alone. Not a long one: a ChEBI-length description (~100 tokens) already fills the CPU's
    kernels alone, and in batches it ran slower (docs/serving.md), so a text over `max_chars` runs
    alone. Similar lengths only, because a batch is padded to its longest: `spread` bounds the ratio
    of any member's length (in characters) to the oldest one's.

    `encode(list of str) -> (N, D)` runs in the worker threads (ONNX Runtime and torch release the GIL);
    an exception reaches every query of its batch, and the workers carry on."""

    def __init__(self, encode, workers: int = 2, max_batch: int = 32, spread: float = 1.5, max_chars: int = 200):
        self.encode, self.max_batch, self.spread, self.max_chars = encode, max_batch, spread, max_chars
        self.waiting: deque = deque()  # (text, future, loop), oldest first
        self.ready = threading.Condition()
        self.batches = self.queries = self.in_caller = 0
        for i in range(workers):
            threading.Thread(target=self._work, name=f"query-batcher-{i}", daemon=True).start()

    async def __call__(self, text: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.ready:
            self.waiting.append((text, future, loop))
            self.ready.notify()
        vector, forward_ms, forward_cpu_ms = await future
        _report_forward(forward_ms, forward_cpu_ms)
        return vector

    def encode_here(self, text: str) -> np.ndarray:
        """One query's forward in the calling thread, timed as a batch's: for a query alone in its replica,
        whose hops to a worker thread and back cost more than they buy (each wakes a sleeping core)."""
        vectors, forward_ms, forward_cpu_ms = self._forward([text])
        self.batches, self.queries, self.in_caller = self.batches + 1, self.queries + 1, self.in_caller + 1
        _report_forward(forward_ms, forward_cpu_ms)
        return vectors[0]

    def _forward(self, texts: list[str]) -> tuple[np.ndarray, float, float]:
        """The encoder on `texts`, with its wall and CPU milliseconds (this thread's)."""
        started, started_cpu = time.perf_counter(), time.thread_time()
        vectors = np.asarray(self.encode(texts))
        return vectors, 1000 * (time.perf_counter() - started), 1000 * (time.thread_time() - started_cpu)

    def _take(self) -> list[tuple]:
        with self.ready:
            while not self.waiting:
                self.ready.wait()
            first = self.waiting.popleft()
            if len(first[0]) > self.max_chars:
                return [first]
            low, high = len(first[0]) / self.spread, min(len(first[0]) * self.spread, self.max_chars)
            batch, rest = [first], deque()
            while self.waiting and len(batch) < self.max_batch:
                item = self.waiting.popleft()
                (batch if low <= len(item[0]) <= high else rest).append(item)
            self.waiting.extendleft(reversed(rest))  # the others keep their place in the queue
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            try:
                vectors, forward_ms, forward_cpu_ms = self._forward([text for text, _, _ in batch])
                outcomes = [(True, (vector, forward_ms, forward_cpu_ms)) for vector in vectors]
            except Exception as error:  # noqa: BLE001: handed to the waiting requests, whatever it is
                outcomes = [(False, error)] * len(batch)
            self.batches, self.queries = self.batches + 1, self.queries + len(batch)
            for (_, future, loop), outcome in zip(batch, outcomes):
                loop.call_soon_threadsafe(_settle, future, *outcome)

    def stats(self) -> dict:
        return {"batches": self.batches, "queries": self.queries, "in_caller": self.in_caller}


# the Timings of the request being handled, for stages timed below the handler (the batcher's forward)
REQUEST_TIMINGS: ContextVar["Timings | None"] = ContextVar("request_timings", default=None)


def _report_forward(forward_ms: float, forward_cpu_ms: float) -> None:
    """A forward's wall and CPU time into the request's Server-Timing: the forward apart from the wait for
    a worker and the thread hops around it; its CPU time below its wall time when it waited for a core."""
    timings = REQUEST_TIMINGS.get()
    if timings is not None:
        timings.add("forward", forward_ms)
        timings.add("forward_cpu", forward_cpu_ms)


def _settle(future: asyncio.Future, ok: bool, value) -> None:
    if not future.done():  # a client that hung up cancelled its wait
        future.set_result(value) if ok else future.set_exception(value)


class Timings:
    """Where one request's time went, as an HTTP Server-Timing header (read by browsers' developer
    tools and by serve/benchmark.py): each stage's milliseconds, and the handler's total."""

    def __init__(self):
        self.started, self.stages = time.perf_counter(), {}

    def add(self, name: str, ms: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + ms

    def activate(self) -> None:
        """Stages timed below the handler (the batcher's forward) report here, for this task and the
        tasks it starts. (A method rather than the ContextVar itself in serve/app.py: Serve pickles
        the ingress with the globals it names, and a ContextVar cannot be pickled.)"""
        REQUEST_TIMINGS.set(self)

    @contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, 1000 * (time.perf_counter() - started))

    def header(self) -> str:
        total = 1000 * (time.perf_counter() - self.started)
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in {**self.stages, "handler": total}.items())

    @staticmethod
    def parse(header: str) -> dict[str, float]:
        """`encode;dur=12.10, search;dur=1.52, ...` (a `header()`) -> {stage: ms}."""
        stages = {}
        for part in filter(None, (p.strip() for p in header.split(","))):
            name, _, duration = part.partition(";dur=")
            stages[name] = float(duration)
        return stages


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is a 413 before any handler reads it, a bad
    Content-Length a 400. A body without a length (chunked) is read up to the limit here and handed on.
    Plain ASGI rather than FastAPI's `@app.middleware("http")`, whose per-request task and stream
    cost ~0.7 ms of CPU a request (docs/serving.md): a sixth of a short query's encoder time."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._refuse(400, f"bad content-length {length.decode('latin-1')!r}", scope, receive, send)
            if int(length) > self.max_bytes:
                return await self._refuse(413, f"body of {int(length)} bytes; at most {self.max_bytes}", scope,
                                          receive, send)
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(413, f"body over {self.max_bytes} bytes", scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(status: int, detail: str, scope, receive, send):
        from starlette.responses import JSONResponse

        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


def static_file(name: str) -> Path:
    """The page's file called `name`: only a file directly inside serve/static/ with a web type; anything
    else (`../app.py`, an absolute path, a link out of the folder) is a 404."""
    path = (STATIC / name).resolve()
    if path.parent != STATIC.resolve() or path.suffix not in STATIC_TYPES or not path.is_file():
        raise HTTPException(status_code=404, detail=f"no static file {name!r}")
    return path
