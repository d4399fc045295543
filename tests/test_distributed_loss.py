"""Two gloo processes, each holding half of a global batch, give the loss and gradients of one
process holding all of it (within 1e-5): gathered features with autograd, global BatchNorm.
Computed in float64; in float32 the two differ by summation order only (about 1e-5 of the gradient scale)."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tmr.config import load_config
from tmr.data import MoleculeTextDataset, PairCollator
from tmr.losses import AlignmentLoss, Discriminator
from tmr.model import create_model

GLOBAL_BATCH = 16


def loss_and_gradients(path, rows, config):
    """Loss of `rows` (slices of a fixed global batch) and every parameter's gradient."""
    torch.manual_seed(0)
    # float64, so that the check is about the mathematics, not float32 summation order
    model = create_model(config.model).double().train()
    discriminator = Discriminator(config.model.embed_dim).double()
    dataset = MoleculeTextDataset(path, progress=False)
    items = [dataset[i] for i in range(GLOBAL_BATCH)]
    batch = PairCollator(model.tokenizer, config.model.text.max_length)(items)  # padded as one global batch
    from torch_geometric.data import Batch

    local = {"graphs": Batch.from_data_list(items[rows]), "input_ids": batch["input_ids"][rows],
             "attention_mask": batch["attention_mask"][rows]}
    terms = AlignmentLoss(config.loss)(model(local), discriminator, model.logit_scale)
    terms["loss"].backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


def worker(rank, world_size, init_file, path, overrides, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    config = load_config("tiny", overrides)
    share = GLOBAL_BATCH // world_size
    terms, grads = loss_and_gradients(path, slice(rank * share, (rank + 1) * share), config)
    for value in list(terms.values()) + list(grads.values()):  # what data parallelism does: average
        dist.all_reduce(value)
        value /= world_size
    if rank == 0:
        torch.save({"terms": terms, "grads": grads}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("overrides", [[], ["loss.first_order=infonce", "loss.second_order_similarity=cosine"]])
def test_two_workers_equal_one_process(tmp_path, small_root, overrides):
    path = small_root / "validation.txt"
    config = load_config("tiny", overrides)
    reference_terms, reference_grads = loss_and_gradients(path, slice(0, GLOBAL_BATCH), config)
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), path, overrides, str(out)), nprocs=2, join=True)
    result = torch.load(out)
    assert set(result["terms"]) == set(reference_terms)
    for name, value in reference_terms.items():
        assert torch.allclose(result["terms"][name], value, atol=1e-5), name
    assert set(result["grads"]) == set(reference_grads)
    for name, grad in reference_grads.items():
        assert torch.allclose(result["grads"][name], grad, atol=1e-5, rtol=0), name
    # the batch is really split: a single half gives a different loss
    half_terms, _ = loss_and_gradients(path, slice(0, GLOBAL_BATCH // 2), config)
    assert not torch.allclose(half_terms["loss"], reference_terms["loss"], atol=1e-4)
