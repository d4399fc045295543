"""The model: unit-norm embeddings, both molecule encoders, K = 0, and the save/load round trip."""

import json

import pytest
import torch
from torch_geometric.data import Batch

from tmr.config import load_config
from tmr.data import InvalidMolecule, featurize
from tmr.model import create_model, drop_tokens, from_pretrained

TEXTS = ["The molecule is ethanol, a primary alcohol.", "The molecule is benzene, an aromatic hydrocarbon."]
SMILES = ["CCO", "c1ccccc1", "CC(C)Cc1ccc(cc1)C(C)C(=O)O"]


@pytest.mark.parametrize("overrides", [[], ["model.molecule.kind=gcn_mol2vec"], ["model.projector.memory_size=0"],
                                       ["model.head_norm=layer"]])
def test_save_load_round_trip_gives_identical_embeddings(tmp_path, overrides, chebi_root):
    config = load_config("tiny", overrides + [f"model.molecule.mol2vec_path={chebi_root.parent / 'mol2vec/tokens.npz'}"])
    model = create_model(config.model)
    with torch.no_grad():  # move the BatchNorm statistics away from their initial values
        model.train()
        model.head(torch.randn(32, config.model.embed_dim), 0)  # texts
        model.head(torch.randn(32, config.model.embed_dim) + 1.0, 1)  # molecules: other statistics
    text, molecule = model.encode_text(TEXTS), model.encode_molecule(SMILES)
    assert text.shape == (2, 64) and molecule.shape == (3, 64)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors", "text_encoder"]
    assert not list(tmp_path.glob(".model*"))  # no staging directory left behind
    loaded = from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.encode_text(TEXTS), text)
    assert torch.equal(loaded.encode_molecule(SMILES), molecule)
    assert json.loads((tmp_path / "model/config.json").read_text())["tmr_model"]["molecule"]["kind"] == config.model.molecule.kind


def test_encoding_runs_in_eval_mode_whatever_mode_the_model_was_left_in():
    """encode_* skip eval() when nothing trains (tmr.model.TMRModel.ensure_eval): a submodule left
    training alone (here the head's BatchNorm, which would use the batch's own statistics) still counts."""
    model = create_model(load_config("tiny").model)
    with torch.no_grad():  # running statistics away from the batch statistics of two texts
        model.train()
        model.head(torch.randn(32, 64) + 2.0, 0)
        model.head(torch.randn(32, 64) - 2.0, 1)
    model.eval()
    text, molecule = model.encode_text(TEXTS), model.encode_molecule(SMILES)
    for left_training in (model.head, model):
        left_training.train()
        assert torch.equal(model.encode_text(TEXTS), text)
        left_training.train()
        assert torch.equal(model.encode_molecule(SMILES), molecule)


def test_save_replaces_an_existing_directory(tmp_path):
    model = create_model(load_config("tiny").model)
    model.save_pretrained(tmp_path / "best")
    with torch.no_grad():
        model.head.linear.bias.add_(1.0)
    model.save_pretrained(tmp_path / "best")
    assert torch.equal(from_pretrained(tmp_path / "best").head.linear.bias, model.head.linear.bias)


def test_trainable_layers_freezes_the_lower_text_layers():
    model = create_model(load_config("tiny", ["model.text.trainable_layers=2"]).model)
    layers = model.text_encoder.layers()
    trainable = [any(p.requires_grad for p in layer.parameters()) for layer in layers]
    assert trainable == [False] * (len(layers) - 2) + [True, True]
    assert not any(p.requires_grad for p in model.text_encoder.backbone.embeddings.parameters())
    assert all(p.requires_grad for p in model.molecule_encoder.parameters())


def test_memory_bank_is_shared_by_both_modalities():
    model = create_model(load_config("tiny").model)
    batch_text = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    model.zero_grad()
    model.train()
    text, _ = model.forward_text(batch_text["input_ids"], batch_text["attention_mask"])
    text.sum().backward()
    from_text = model.projector.memory.grad.clone()
    model.zero_grad()
    from tmr.data import featurize
    from torch_geometric.data import Batch

    molecule, _ = model.forward_molecule(Batch.from_data_list([featurize(s) for s in SMILES]))
    molecule.sum().backward()
    assert from_text.abs().sum() > 0 and model.projector.memory.grad.abs().sum() > 0


def test_invalid_smiles_is_named_in_the_error():
    model = create_model(load_config("tiny").model)
    with pytest.raises(InvalidMolecule, match="C1CC"):
        model.encode_molecule(["CCO", "C1CC"])


def test_cached_text_states_match_the_full_text_path(small_root):
    from tmr.data import MoleculeTextDataset
    from tmr.train import embed_pairs

    model = create_model(load_config("tiny", ["model.text.trainable_layers=0"]).model)
    dataset = MoleculeTextDataset(small_root / "validation.txt", progress=False)
    states = model.text_encoder.backbone_states(dataset.texts, model.config.text.max_length)
    assert len(states) == len(set(dataset.texts)) and next(iter(states.values())).dtype == torch.float16
    full_text, full_molecule = embed_pairs(model, dataset)
    cached_text, cached_molecule = embed_pairs(model, dataset, text_states=states)
    assert torch.equal(full_molecule, cached_molecule)
    assert torch.allclose(full_text, cached_text, atol=5e-3)  # fp16 cache
    with pytest.raises(ValueError, match="frozen"):
        create_model(load_config("tiny").model).text_encoder.backbone_states(["x"], 16)


def test_text_state_cache_is_written_once_and_read_back(small_root, tmp_path, monkeypatch):
    import tmr.data.sources
    from tmr.train import cached_backbone_states

    monkeypatch.setattr(tmr.data.sources, "CACHE", tmp_path)
    model = create_model(load_config("tiny", ["model.text.trainable_layers=0"]).model)
    texts = ["The molecule is ethanol.", "The molecule is benzene.", "The molecule is ethanol."]
    computed = cached_backbone_states(model, texts, 32, progress=False)
    stored = sorted(p.name for p in (tmp_path / "text_states").iterdir())
    assert len(stored) == 2 and stored[1] == stored[0] + ".lock" and stored[0].endswith(".safetensors")  # no partial left
    def recompute(*args, **kwargs):  # a second run must read the file, never run the backbone again
        raise AssertionError("the backbone ran again: the cache was not read")
    monkeypatch.setattr(model.text_encoder, "backbone_states", recompute)
    read_back = cached_backbone_states(model, texts, 32, progress=False)
    assert sorted(read_back) == sorted(computed) == sorted(set(texts))
    assert all(torch.equal(read_back[t], computed[t]) for t in computed)


def test_prepared_caches_leave_every_seed_nothing_to_compute(small_root, tmp_path, monkeypatch):
    """tmr.train.prepare_caches, what tune/compare.py and tune/sweep.py run on every core before their
    one-CPU trials: afterwards a trial of another seed reads every text's states from disk."""
    import tmr.data.sources
    from tmr.data import load_splits
    from tmr.train import make_collator, prepare_caches

    monkeypatch.setattr(tmr.data.sources, "CACHE", tmp_path)
    config = load_config("tiny", ["model.text.trainable_layers=0", "train.cache_text_states=true", f"data={small_root}"])
    prepare_caches(config, progress=False)
    assert len(list((tmp_path / "text_states").glob("*.safetensors"))) == 1
    import safetensors.torch

    def read(*args, **kwargs):
        raise AssertionError("prepare_caches read a text-state file it only had to find")
    with monkeypatch.context() as patch:  # a resumed comparison prepares again: the file is there, left unread
        patch.setattr(safetensors.torch, "load_file", read)
        prepare_caches(config, progress=False)
    model = create_model(config.model)
    def recompute(*args, **kwargs):
        raise AssertionError("the backbone ran in the trial: prepare_caches did not fill its cache")
    monkeypatch.setattr(model.text_encoder, "backbone_states", recompute)
    splits = load_splits(small_root, seed=config.train.seed + 1, corpus=config.corpus)  # a trial of another seed
    states = make_collator(model, config, splits, progress=False).text_states
    assert set(states) == {text for d in splits.pool + splits.fit_sources for text in d.texts}


def test_bf16_text_states_stay_close_to_fp32_and_are_cached_apart(small_root, tmp_path, monkeypatch):
    """The frozen backbone's one-off run in bf16 (the default where the CPU has AMX): every token's state
    within cosine 0.999 of fp32's, the model's text embeddings within 0.999 too, and its own cache file."""
    import tmr.data.sources
    from tmr.data import MoleculeTextDataset
    from tmr.train import cached_backbone_states, embed_texts, states_in_bf16

    monkeypatch.setattr(tmr.data.sources, "CACHE", tmp_path)
    model = create_model(load_config("tiny", ["model.text.trainable_layers=0"]).model)
    texts = MoleculeTextDataset(small_root / "validation.txt", progress=False).texts[:24]
    fp32 = cached_backbone_states(model, texts, 48, progress=False, bf16=False)
    bf16 = cached_backbone_states(model, texts, 48, progress=False, bf16=True)
    assert len(list((tmp_path / "text_states").glob("*.safetensors"))) == 2  # one file per precision
    for text in set(texts):
        assert fp32[text].shape == bf16[text].shape and bf16[text].dtype == torch.float16
        assert not torch.equal(fp32[text], bf16[text])  # bf16 really ran
        cosine = torch.nn.functional.cosine_similarity(fp32[text].float(), bf16[text].float(), dim=-1)
        assert cosine.min() > 0.999, (text, cosine.min())
    embedded = torch.nn.functional.cosine_similarity(embed_texts(model, texts, fp32), embed_texts(model, texts, bf16))
    assert embedded.min() > 0.999
    assert states_in_bf16("fp32", torch.device("cpu")) is False and states_in_bf16("bf16", torch.device("cpu")) is True
    from tmr.config import check_config
    with pytest.raises(ValueError, match="text_states_precision"):
        check_config(load_config("tiny", ["train.text_states_precision=fp16"]))


def test_memory_bank_equals_multihead_attention_averaged_over_slots():
    """The projector's cheaper arrangement (key and value projections folded out of the per-row work)
    computes nn.MultiheadAttention's slots, averaged, and trains like it: every gradient equal."""
    from tmr.model import MemoryBankProjector

    torch.manual_seed(0)
    projector = MemoryBankProjector(dim=32, memory_size=5, num_heads=4).double()
    reference = torch.nn.MultiheadAttention(32, 4, batch_first=True).double()
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([projector.query.weight, projector.key.weight, projector.value.weight]))
        reference.in_proj_bias.copy_(torch.cat([projector.query.bias, projector.key.bias, projector.value.bias]))
        reference.out_proj.weight.copy_(projector.out.weight)
        reference.out_proj.bias.copy_(projector.out.bias)
    features = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] + [False] * 6])
    queries = projector.memory.detach().unsqueeze(0).repeat(3, 1, 1).requires_grad_(True)
    slots, _ = reference(queries, features, features, key_padding_mask=~mask, need_weights=False)
    packed, segment = features[mask].detach().requires_grad_(True), mask.nonzero()[:, 0]  # what the encoders hand it
    ours = projector(packed, segment, 3)
    assert torch.allclose(ours, slots.mean(1), atol=1e-12)

    weights = torch.randn_like(ours)  # any downstream loss
    (weights * ours).sum().backward()
    (weights * slots.mean(1)).sum().backward()
    dim = 32
    assert torch.allclose(packed.grad, features.grad[mask], atol=1e-12)
    for i, part in enumerate((projector.query, projector.key, projector.value)):
        assert torch.allclose(part.weight.grad, reference.in_proj_weight.grad[i * dim:(i + 1) * dim], atol=1e-12)
        assert torch.allclose(part.bias.grad, reference.in_proj_bias.grad[i * dim:(i + 1) * dim], atol=1e-12)
    assert torch.allclose(projector.out.weight.grad, reference.out_proj.weight.grad, atol=1e-12)
    assert torch.allclose(projector.memory.grad, queries.grad.sum(0), atol=1e-12)


def test_inference_path_equals_the_training_path(chebi_root):
    """Without autograd the model runs GINE once per distinct atom environment, its products through
    OpenBLAS, and folds the projector's key/value projections (tmr/model.py, tmr/encoders.py): the
    embeddings equal those of the path training differentiates, for both modalities, with Mol2vec
    inputs too, on a batch with repeated, symmetric, disconnected and one-atom molecules."""
    torch.manual_seed(0)
    config = load_config("cpu", [f"model.molecule.mol2vec_path={chebi_root.parent / 'mol2vec/tokens.npz'}"])
    model = create_model(config.model).eval()
    from torch_geometric.data import Batch

    from tmr.data import featurize
    from tmr.data.sources import read_pairs

    pairs, _ = read_pairs(chebi_root / "validation.txt")
    smiles = SMILES + ["O=C(O)C1=CC=CC=C1O", "C[C@H](N)C(=O)O", "[Na+].[Cl-]", "N#Cc1ccc(Br)cc1", "[He]", "CCO",
                       "C1CCCCC1", "c1ccc2ccccc2c1"] + [p.smiles for p in pairs[:150]]
    graphs = Batch.from_data_list([featurize(s) for s in smiles])
    tokens = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    outputs = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            outputs.append((model.forward_text(tokens["input_ids"], tokens["attention_mask"])[0].detach(),
                            *(part.detach() for part in model.forward_molecule(graphs))))
    (texts, molecules, pooled), (fast_texts, fast_molecules, fast_pooled) = outputs
    assert torch.allclose(texts, fast_texts, atol=1e-5)
    assert torch.allclose(molecules, fast_molecules, atol=1e-5) and torch.allclose(pooled, fast_pooled, atol=1e-5)
    with torch.no_grad():  # the inference path (OpenBLAS) against PyG's layers atom by atom, not against itself
        nodes, rows, segment = model.molecule_encoder.forward_distinct(graphs)
        reference = gine_atom_by_atom(model.molecule_encoder, graphs)
    assert len(nodes) < 0.8 * graphs.num_nodes  # environments really are shared (and each computed once)
    assert torch.allclose(nodes[rows], reference, atol=1e-5)


def gine_atom_by_atom(encoder, graphs):
    """The GINE encoder as PyG's layers compute it, every atom on its own: the reference."""
    import torch.nn.functional as F

    h = encoder.atoms(graphs.x)
    if encoder.mol2vec_proj is not None:
        h = h + encoder.mol2vec_proj(encoder.mol2vec(graphs.morgan))
    for i, (conv, bonds) in enumerate(zip(encoder.convs, encoder.bonds)):
        h = conv(h, graphs.edge_index, bonds(graphs.edge_attr))
        h = F.relu(h) if i < len(encoder.convs) - 1 else h
    return encoder.norm(encoder.mlp(h))


def test_training_runs_gine_once_per_atom_environment_with_pyg_s_values_and_gradients(chebi_root):
    """Training computes GINE once per distinct atom environment and gathers it to the atoms
    (1.25x a `cpu` step, docs/training.md): the atoms' features and every parameter's gradient
    equal PyG's GINEConv applied atom by atom (float64, so only the summation order differs), with
    Mol2vec inputs, on ChEBI-20 molecules plus repeated, symmetric, disconnected and one-atom ones."""
    from tmr.data.sources import read_pairs

    torch.manual_seed(0)
    config = load_config("cpu", [f"model.molecule.mol2vec_path={chebi_root.parent / 'mol2vec/tokens.npz'}"])
    encoder = create_model(config.model).molecule_encoder.double().train()
    pairs, _ = read_pairs(chebi_root / "validation.txt")
    smiles = SMILES + ["O=C(O)C1=CC=CC=C1O", "CCO", "CCO", "[Na+].[Cl-]", "[He]", "C1CCCCC1"] + [p.smiles for p in pairs[:60]]
    graphs = Batch.from_data_list([featurize(s) for s in smiles])
    weights = torch.randn(graphs.num_nodes, encoder.norm.normalized_shape[0], dtype=torch.float64)
    gradients = []
    for forward in (lambda: encoder(graphs)[0], lambda: gine_atom_by_atom(encoder, graphs)):
        encoder.zero_grad()
        nodes = forward()
        (weights * nodes).sum().backward()
        gradients.append((nodes.detach(), {name: p.grad.clone() for name, p in encoder.named_parameters()
                                           if p.grad is not None}))
    (ours, our_grads), (reference, reference_grads) = gradients
    assert torch.allclose(ours, reference, atol=1e-10)
    assert our_grads.keys() == reference_grads.keys() and len(our_grads) >= 20
    for name, grad in reference_grads.items():
        assert torch.allclose(our_grads[name], grad, atol=1e-9 * max(1.0, float(grad.abs().max()))), name
    assert len(encoder.forward_distinct(graphs)[0]) < 0.8 * graphs.num_nodes  # fewer rows than atoms


def test_atom_environments_are_weisfeiler_lehman_colours():
    """Two atoms share an environment after a layer iff they had the same one before and the same
    multiset of (neighbour environment, bond): benzene's atoms are one, toluene's ring splits by
    distance from the methyl, and the same molecule twice in a batch shares every environment."""
    from torch_geometric.data import Batch

    from tmr.data import featurize
    from tmr.encoders import _refine

    def colours(smiles, layers):
        graphs = Batch.from_data_list([featurize(s) for s in smiles])
        colour = torch.unique(graphs.x @ torch.tensor([1 << (6 * i) for i in range(9)]), return_inverse=True)[1]
        bond = torch.unique(graphs.edge_attr @ torch.tensor([1, 64, 4096]), return_inverse=True)[1]
        source, target = graphs.edge_index
        for _ in range(layers):
            colour, count = _refine(colour, colour[source] * (int(bond.max()) + 1) + bond, target,
                                    (int(colour.max()) + 1) * (int(bond.max()) + 1))
        return colour.tolist()

    assert len(set(colours(["c1ccccc1"], 3))) == 1
    toluene = colours(["Cc1ccccc1"], 3)  # methyl, ipso, ortho, meta, para, meta, ortho
    assert toluene[2] == toluene[6] and toluene[3] == toluene[5] and len(set(toluene)) == 5
    assert len(set(colours(["Cc1ccccc1"], 1))) == 4  # after one layer ortho/meta/para are not yet told apart
    twice = colours(["CC(=O)O", "CC(=O)O"], 3)
    assert twice[:4] == twice[4:]


def test_token_dropout_hides_tokens_in_training_only():
    torch.manual_seed(0)
    mask = torch.ones(16, 40, dtype=torch.long)
    mask[8:, 30:] = 0  # padding
    dropped = drop_tokens(mask, 0.5)
    assert torch.all(dropped <= mask) and torch.all(dropped[:, 0] == 1)  # only hides; [CLS] always stays
    assert 0.4 < 1 - dropped.sum().item() / mask.sum().item() < 0.6

    model = create_model(load_config("tiny", ["model.text.token_dropout=0.5"]).model)
    plain = create_model(load_config("tiny").model)
    plain.load_state_dict(model.state_dict())
    tokens = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
             "graphs": Batch.from_data_list([featurize(s) for s in SMILES[:2]])}
    for m in (model, plain):
        m.train()
        m.text_encoder.backbone.eval()  # no backbone dropout: token dropout is the only randomness
    with torch.no_grad():
        full = plain.forward_text(tokens["input_ids"], tokens["attention_mask"])[1]
        assert torch.allclose(plain(batch)["text_pooled"], full)
        assert not torch.allclose(model(batch)["text_pooled"], full)  # training saw fewer tokens
    plain.load_state_dict(model.state_dict())  # (the training passes moved the BatchNorm statistics)
    model.eval()
    plain.eval()  # inference reads every token: the same embeddings as a model without token dropout
    assert torch.equal(model.encode_text(TEXTS), plain.encode_text(TEXTS))


def test_the_same_batch_gives_the_same_gradients_to_the_bit(chebi_root):
    """Runs of one seed train one model (the fault drill's resumed run equals an uninterrupted one):
    the per-environment GINE gathers rows so that their gradients sum in a fixed order, on 2 threads."""
    from tmr.data.sources import read_pairs

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        config = load_config("cpu", [f"model.molecule.mol2vec_path={chebi_root.parent / 'mol2vec/tokens.npz'}"])
        encoder = create_model(config.model).molecule_encoder.train()
        pairs, _ = read_pairs(chebi_root / "validation.txt")
        graphs = Batch.from_data_list([featurize(p.smiles) for p in pairs[:128]])
        weights = torch.randn(encoder.norm.normalized_shape[0])
        runs = []
        for _ in range(3):
            encoder.zero_grad()
            (encoder(graphs)[0] @ weights).pow(2).sum().backward()
            runs.append([p.grad.clone() for p in encoder.parameters() if p.grad is not None])
        assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
    finally:
        torch.set_num_threads(threads)
