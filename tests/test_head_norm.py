"""The shared head normalises the same way in training and in inference.

In training, texts and molecules pass through the head in separate calls, so a BatchNorm there
normalises each modality by its own batch statistics. Inference must do the same: a trained
model's eval-mode embeddings (what `tmr eval`, the index and the server use) must rank as well as
the training-mode normalisation of the same model does.
"""

import copy

import pytest
import torch
from torch_geometric.data import Batch

from tmr.config import load_config
from tmr.data import load_splits, read_pairs
from tmr.metrics import retrieval_metrics
from tmr.model import TMRModel
from tmr.train import embed_pairs, fit


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, train_root) -> tuple[TMRModel, object]:
    out = tmp_path_factory.mktemp("head_norm_run")
    config = load_config("tiny", [f"data={train_root}", f"output={out}", "train.epochs=4", "train.max_train_pairs=null",
                                  "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=5",
                                  "model.text.trainable_layers=0"])
    fit(config, progress=False)
    return TMRModel.from_pretrained(out / "best"), load_splits(train_root)


def training_mode_normalisation(model: TMRModel) -> TMRModel:
    """A copy whose head norm uses the statistics of each call's batch (one call per modality), as in training."""
    copied = copy.deepcopy(model).eval()
    copied.head.norm.train()
    copied.head.norm.momentum = 0.0  # read the batch statistics, leave the running ones alone
    return copied


@torch.no_grad()
def embed_in_current_mode(model: TMRModel, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All texts in one call, all molecules in another, without switching any module's mode."""
    items = [dataset[i] for i in range(len(dataset))]
    tokens = model.tokenizer([item.text for item in items], padding=True, truncation=True,
                             max_length=model.config.text.max_length, return_tensors="pt")
    text = model.forward_text(tokens["input_ids"], tokens["attention_mask"])[0]
    molecule = model.forward_molecule(Batch.from_data_list(items))[0]
    return text, molecule


def mrr(model: TMRModel, dataset) -> dict[str, float]:
    metrics = retrieval_metrics(*embed_in_current_mode(model, dataset))
    return {d: metrics[d]["mrr"] for d in ("text_to_molecule", "molecule_to_text")}


def test_eval_mode_ranks_as_well_as_training_mode_normalisation(trained_model):
    model, splits = trained_model
    assert len(splits.select) <= 256
    served = mrr(model.eval(), splits.select)
    as_trained = mrr(training_mode_normalisation(model), splits.select)
    print("eval mode", served, "training-mode normalisation", as_trained)
    for direction in served:
        assert served[direction] >= as_trained[direction] - 3.0, (direction, served, as_trained)


def test_encode_paths_use_the_modality_statistics(trained_model, train_root):
    """encode_text / encode_molecule (the serving path) equal the evaluation path."""
    model, splits = trained_model
    items = [splits.select[i] for i in range(8)]
    text, molecule = embed_pairs(model, splits.select)
    assert torch.allclose(model.encode_text([item.text for item in items]), text[:8], atol=1e-5)
    raw = {pair.id: pair.smiles for pair in read_pairs(train_root / "validation.txt")[0]}  # as featurised
    assert torch.allclose(model.encode_molecule([raw[item.id] for item in items]), molecule[:8], atol=1e-5)
