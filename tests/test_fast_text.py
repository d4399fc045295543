"""The served text path on ONNX Runtime equals the torch path on every ChEBI-20 validation description."""

import pytest
import torch

from tmr.config import load_config
from tmr.data import MoleculeTextDataset
from tmr.fast_text import FastTextEncoder, exported_path, text_encoder_for
from tmr.model import create_model, from_pretrained


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model with the production text path (MiniLM, 256 tokens, token projection, memory bank, head)."""
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    create_model(load_config("tiny", ["model.text.max_length=256", "model.projector.memory_size=16"]).model
                 ).save_pretrained(directory)
    return directory


def test_onnx_text_path_equals_torch_on_every_validation_description(model_dir, chebi_root):
    texts = MoleculeTextDataset(chebi_root / "validation.txt", progress=False).texts
    assert len(texts) == 3301
    model = from_pretrained(model_dir)
    fast = FastTextEncoder.load(model, model_dir, threads=2)
    assert fast.graph == exported_path(model_dir) and fast.graph.exists()  # cached beside the model
    cosine = (fast.encode(texts) * model.encode_text(texts)).sum(-1)  # both unit norm
    assert cosine.min() >= 0.9999, (cosine.min().item(), texts[int(cosine.argmin())][:80])
    assert cosine.shape == (3301,)


def test_the_engine_is_chosen_and_torch_stays_the_fallback(model_dir, monkeypatch):
    model = from_pretrained(model_dir)
    encode, engine = text_encoder_for(model, model_dir)
    assert engine == "onnxruntime"
    stamp = exported_path(model_dir).stat().st_mtime_ns
    assert text_encoder_for(model, model_dir)[1] == "onnxruntime"
    assert exported_path(model_dir).stat().st_mtime_ns == stamp  # exported once, then read back
    monkeypatch.setenv("TMR_TEXT_ENGINE", "torch")
    encode_torch, engine = text_encoder_for(model, model_dir)
    assert engine == "torch"
    query = ["an anti-inflammatory aryl propionic acid"]
    assert torch.allclose(encode(query), encode_torch(query), atol=1e-4)


def test_cached_text_states_run_on_onnx_runtime_and_equal_torchs(model_dir, chebi_root, tmp_path, monkeypatch):
    """The main job's one-off run of the frozen backbone (tmr.train.cached_backbone_states, fp32 on a
    CPU) goes through ONNX Runtime; every token's state equals the torch backbone's within cosine 0.9999."""
    import tmr.data.sources
    import tmr.fast_text
    from tmr.train import cached_backbone_states

    monkeypatch.setattr(tmr.data.sources, "CACHE", tmp_path)
    texts = MoleculeTextDataset(chebi_root / "validation.txt", progress=False).texts[::50]  # 67, all lengths
    model = from_pretrained(model_dir)
    model.text_encoder.backbone.requires_grad_(False)  # frozen, as with train.cache_text_states
    calls = []
    bulk = tmr.fast_text.bulk_backbone
    monkeypatch.setattr(tmr.fast_text, "bulk_backbone", lambda *args: calls.append(args) or bulk(*args))
    states = cached_backbone_states(model, texts, 256, progress=False, bf16=False)
    assert len(calls) == 1  # the engine ran
    reference = model.text_encoder.backbone_states(texts, 256)  # torch
    for text in texts:
        assert states[text].shape == reference[text].shape and states[text].dtype == torch.float16
        cosine = torch.nn.functional.cosine_similarity(states[text].float(), reference[text].float(), dim=-1)
        assert cosine.min() >= 0.9999, (text[:60], cosine.min().item())
    monkeypatch.setenv("TMR_TEXT_ENGINE", "torch")  # the switch that keeps torch
    assert tmr.fast_text.bulk_backbone(model, 1) is None
