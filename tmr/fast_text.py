"""The text backbone on ONNX Runtime: the query-time encoder (the transformer exported once per model, the
rest of the text path, token projection, memory bank and head, left in torch) and training's bulk run.

A served text query is one short batch through MiniLM; eager PyTorch spends most of that in
per-operator overhead, which ONNX Runtime's fused CPU kernels avoid (fp32: the same maths, so the
embeddings equal the torch path's to rounding; tests/test_fast_text.py holds them to cosine 0.9999
on every ChEBI-20 validation description). The backbone is the only heavy part; exporting just it
keeps the packed, segment-indexed memory-bank code in one implementation.

    encoder = FastTextEncoder.load(model, model_dir, threads=1)   # exports on first use, then cached
    vectors = encoder.encode(["an anti-inflammatory aryl propionic acid"])   # == model.encode_text(...)

Training uses the same export for its one bulk run of a frozen backbone (`bulk_backbone`: the cached text
states, fp32 on a CPU). Without onnxruntime (or with TMR_TEXT_ENGINE=torch) both fall back to torch.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np
import torch

from tmr.atomic import atomic_file
from tmr.index import model_fingerprint
from tmr.model import TMRModel

log = logging.getLogger("tmr.fast_text")
OPSET = 17
# texts per ONNX Runtime call in the bulk run: length-sorted ChEBI-20 texts on 2 threads ran 1.2x (short and
# mid-length) to 1.5x (the longest) faster in batches of 4 than of 64 (a batch's activations stay in cache)
BULK_BATCH = 4


class _Backbone(torch.nn.Module):
    """(input_ids, attention_mask) -> last hidden states, with positions and token types made here
    from the input's shape, so the exported graph has no buffer sliced to the length it was traced at."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             token_type_ids=torch.zeros_like(input_ids)).last_hidden_state


def export_backbone(model: TMRModel, path: Path) -> Path:
    """Write the model's text backbone as ONNX (dynamic batch and length), atomically."""
    backbone = model.text_encoder.backbone
    implementation = backbone.config._attn_implementation
    backbone.set_attn_implementation("eager")  # the plain attention ops export exactly; SDPA's kernel choice does not
    wrapper = _Backbone(backbone).eval()
    tokens = model.tokenizer(["The molecule is a monocarboxylic acid.", "It is a conjugate base."], padding=True,
                             return_tensors="pt")
    try:
        with torch.no_grad(), atomic_file(path) as partial:
            torch.onnx.export(wrapper, (tokens["input_ids"], tokens["attention_mask"]), str(partial),
                              input_names=["input_ids", "attention_mask"], output_names=["states"],
                              dynamic_axes={name: {0: "batch", 1: "tokens"}
                                            for name in ("input_ids", "attention_mask", "states")},
                              opset_version=OPSET, dynamo=False)
    finally:
        backbone.set_attn_implementation(implementation)
    return path


def exported_path(model_dir: str | Path) -> Path:
    """Beside the model (`<model_dir>/text_backbone.onnx`) when that folder is writable, else in tmr's
    cache; keyed by the model's fingerprint either way, so a retrained model never reads a stale graph."""
    from tmr.data.sources import CACHE

    name = f"text_backbone.{model_fingerprint(model_dir)}.onnx"
    directory = Path(model_dir)
    return directory / name if os.access(directory, os.W_OK) else CACHE / "onnx" / name


def engine_enabled(what: str) -> bool:
    """Whether ONNX Runtime runs `what`: onnxruntime and onnx (which the export needs) installed, and not
    switched off with $TMR_TEXT_ENGINE=torch; a missing package is logged, and torch runs it."""
    if os.environ.get("TMR_TEXT_ENGINE", "onnx") == "torch":
        return False
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        log.warning("onnxruntime/onnx not installed (%s): %s run on torch", error, what)
        return False
    return True


def cpu_session(graph: Path, threads: int):
    """An ONNX Runtime CPU session of an exported backbone with its threads set explicitly."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def run_backbone(session, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    feeds = {"input_ids": input_ids.numpy().astype(np.int64), "attention_mask": attention_mask.numpy().astype(np.int64)}
    return torch.from_numpy(session.run(None, feeds)[0])


class FastTextEncoder:
    """model.encode_text with the backbone on ONNX Runtime."""

    def __init__(self, model: TMRModel, graph: Path, threads: int = 1):
        self.session = cpu_session(graph, threads)
        self.model, self.graph = model.eval(), graph

    @classmethod
    def load(cls, model: TMRModel, model_dir: str | Path, threads: int = 1) -> "FastTextEncoder":
        path = exported_path(model_dir)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("exporting the text backbone to %s", path)
            export_backbone(model, path)
        return cls(model, path, threads)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return run_backbone(self.session, input_ids, attention_mask)

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Texts -> (N, D) unit-norm embeddings: TMRModel.encode_text with this engine's backbone states."""
        return self.model.encode_text(texts, batch_size, backbone=self.states)


def bulk_backbone(model: TMRModel, threads: int):
    """The model's backbone on ONNX Runtime for a one-off bulk run on the CPU (tmr.train's cached text
    states), as a callable (input_ids, attention_mask) -> states; None without onnxruntime or with
    $TMR_TEXT_ENGINE=torch.

    Why: on an AVX2 CPU without native bf16 the states of the preset's 29,613 texts ran in fp32 for 20
    minutes on 2 threads, the longest wait of a fresh main job; in batches of 64 length-sorted texts ONNX
    Runtime ran them 1.46x faster than torch on 2 threads (torch barely used the second one), and in
    batches of BULK_BATCH faster again, every token's state equal after the cache's fp16 rounding
    (docs/training.md). The graph is exported to a temporary file (3 s) that the session reads once."""
    import tempfile

    if not engine_enabled("text states"):
        return None
    with tempfile.TemporaryDirectory() as directory:
        session = cpu_session(export_backbone(model, Path(directory) / "text_backbone.onnx"), threads)
    return functools.partial(run_backbone, session)


def text_encoder_for(model: TMRModel, model_dir: str | Path, threads: int = 1):
    """(callable texts -> embeddings, engine name): ONNX Runtime when installed and not switched off
    ($TMR_TEXT_ENGINE=torch), else the model's own torch path."""
    if engine_enabled("text queries"):
        return FastTextEncoder.load(model, model_dir, threads).encode, "onnxruntime"
    return model.encode_text, "torch"
