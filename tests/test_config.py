"""Configs: presets, YAML files and command-line overrides, typed and checked."""

import pytest

from tmr.config import load_config


def test_overrides_are_typed():
    config = load_config("cpu", ["train.epochs=3", "model.projector.memory_size=0", "loss.tau2=0.5",
                                 "train.max_train_pairs=null", "train.bf16=true", "model.text.dropout=0.1"])
    assert config.train.epochs == 3 and config.model.projector.memory_size == 0 and config.loss.tau2 == 0.5
    assert config.train.max_train_pairs is None and config.train.bf16 is True and config.model.text.dropout == 0.1


def test_yaml_file_starts_from_its_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\ntrain:\n  epochs: 7\nloss:\n  first_order: infonce\n")
    config = load_config(str(path), ["train.batch_size=8"])
    assert (config.train.epochs, config.train.batch_size, config.loss.first_order) == (7, 8, "infonce")
    assert config.model.embed_dim == 64  # from the tiny preset


@pytest.mark.parametrize("override, error", [("train.epoch=3", KeyError), ("train.epochs=three", ValueError),
                                             ("train.epochs=2.5", ValueError), ("train", ValueError),
                                             ("model=3", ValueError)])
def test_bad_overrides_are_refused(override, error):
    with pytest.raises(error):
        load_config("cpu", [override])


def test_paper_preset_is_method_md():
    config = load_config("paper")
    assert config.model.text.name == "allenai/scibert_scivocab_uncased" and config.model.text.trainable_layers == -1
    assert (config.model.molecule.kind, config.model.projector.memory_size, config.model.embed_dim) == ("gcn_mol2vec", 28, 300)
    assert (config.train.batch_size, config.train.epochs, config.train.lr, config.train.text_lr) == (32, 60, 1e-4, 3e-5)
    assert (config.loss.margin, config.loss.adversarial_weight, config.loss.intra_weight, config.loss.cross_weight) == (0.3, 2e-4, 1.0, 1.0)


def test_clip_preset_is_the_plain_dual_encoder_baseline():
    config = load_config("clip")
    assert config.model.architecture == "dual_encoder" and config.model.text.trainable_layers == 0
    assert (config.loss.first_order, config.loss.adversarial_weight, config.loss.intra_weight,
            config.loss.cross_weight) == ("infonce", 0.0, 0.0, 0.0)
    assert (config.train.optimizer, config.train.schedule, config.train.lr, config.train.epochs,
            config.train.batch_size) == ("adamw", "onecycle", 1e-3, 30, 64)
