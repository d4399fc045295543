"""Ray Train + DeepSpeed on CPU: 2 workers equal 1 process, a SIGKILLed worker resumes as if never
stopped, re-runs resume, and the engine steps as the plain loop does."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tmr.config import load_config
from tmr.distributed import train_with_ray
from tmr.model import from_pretrained

GLOBAL_BATCH = 16


def fixed_batch_step(loop_config: dict) -> None:
    """One DeepSpeed step's loss and (all-reduced) gradients on this worker's share of a fixed batch."""
    import ray.train
    import torch.distributed as dist
    from torch_geometric.data import Batch

    from tmr.data import MoleculeTextDataset, PairCollator
    from tmr.distributed import build_engine
    from tmr.losses import AlignmentLoss
    from tmr.model import create_model

    config = load_config("tiny", loop_config["overrides"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.manual_seed(0)
    model = create_model(config.model)  # float32: DeepSpeed reduces fp32/fp16/bf16 gradients only
    engine, critic, _ = build_engine(model, config, steps_per_epoch=1, world_size=world, use_gpu=False)
    torch.manual_seed(1)
    items = [MoleculeTextDataset(loop_config["path"], progress=False)[i] for i in range(GLOBAL_BATCH)]
    batch = PairCollator(model.tokenizer, config.model.text.max_length)(items)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    local = {"graphs": Batch.from_data_list(items[rows]), "input_ids": batch["input_ids"][rows],
             "attention_mask": batch["attention_mask"][rows]}
    engine.train()
    terms = AlignmentLoss(config.loss)(engine(local), critic, engine.module.logit_scale)
    engine.backward(terms["loss"])  # DeepSpeed all-reduces (averages) the gradients here
    loss = terms["loss"].detach().clone()
    dist.all_reduce(loss)
    grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters() if p.grad is not None}
    norm = engine.module.head.norm  # per-modality statistics of the global batch, the same on every worker
    running = {"mean": norm.running_mean.clone(), "var": norm.running_var.clone()}
    if rank == 0:
        torch.save({"loss": loss / world, "grads": grads, "running": running}, loop_config["out"])


def run_fixed_batch_step(tmp_path, path, workers: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tmp_path / f"step_{workers}.pt"
    TorchTrainer(fixed_batch_step, train_loop_config={"overrides": [], "path": str(path), "out": str(out)},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"step{workers}", storage_path=str(tmp_path),
                                      worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})).fit()
    return torch.load(out)


def test_two_deepspeed_workers_equal_one(local_ray, tmp_path, small_root):
    path = small_root / "validation.txt"
    one, two = run_fixed_batch_step(tmp_path, path, 1), run_fixed_batch_step(tmp_path, path, 2)
    assert torch.allclose(one["loss"], two["loss"], atol=1e-5)
    assert set(one["grads"]) == set(two["grads"]) and len(one["grads"]) > 20
    for name, grad in one["grads"].items():  # fp32: 1e-5 absolute, plus summation-order noise on large entries
        assert torch.allclose(two["grads"][name], grad, atol=1e-5, rtol=1e-4), name
    for key in ("mean", "var"):  # the head's BatchNorm statistics: global, one row per modality
        assert torch.allclose(two["running"][key], one["running"][key], atol=1e-5), key
    assert not torch.allclose(one["running"]["mean"][0], one["running"]["mean"][1])


def test_a_worker_killed_mid_epoch_resumes_and_trains_as_if_never_stopped(local_ray, tmp_path, train_root):
    """The drill SIGKILLs one worker's process in epoch 2, step 1; Ray Train restarts the group from
    epoch 1's checkpoint. Token dropout and the gradient penalty draw random numbers every step, so
    only a resume that restores the weights, the optimiser and every rank's generators ends with the
    history and weights of the run that was never interrupted."""
    def run(name: str, **drill) -> tuple:
        config = load_config("tiny", [f"data={train_root}", f"output={tmp_path / name}", "train.epochs=2",
                                      "train.num_workers=2", "train.max_train_pairs=64", "model.text.token_dropout=0.2"])
        return config, train_with_ray(config, threads_per_worker=1, **drill)

    _, straight = run("straight")
    config, killed = run("killed", crash_once_at_epoch=2)
    assert (tmp_path / "killed/.crash_drill_done").exists()  # the drill did kill a worker
    history = killed["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert [h["resumed_from_epoch"] for h in history] == [0, 1]  # epoch 2 ran again after resuming epoch 1
    assert [h["resumed_from_epoch"] for h in straight["history"]] == [0, 0]
    for resumed, uninterrupted in zip(history, straight["history"]):
        assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-6, abs=1e-7), resumed
        for key in ("val_mrr_t2m", "val_mrr_m2t"):
            assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-9), (key, resumed["epoch"])
    assert killed["best_epoch"] == straight["best_epoch"]
    weights, expected = (load_file(tmp_path / name / "best/model.safetensors") for name in ("killed", "straight"))
    assert weights.keys() == expected.keys() and len(weights) > 20
    for name, tensor in expected.items():
        assert torch.allclose(weights[name], tensor, atol=1e-6), name
    saved = json.loads((tmp_path / "killed/metrics.json").read_text())
    assert saved["best_epoch"] == max(history, key=lambda h: h["val_mrr"])["epoch"]
    best = from_pretrained(tmp_path / "killed/best")
    assert best.config == config.model
    # the exported head carries recalibrated statistics for each modality (what inference normalises by)
    assert (best.head.norm.num_batches_tracked > 0).all()
    assert not torch.allclose(best.head.norm.running_mean[0], best.head.norm.running_mean[1])
    assert (tmp_path / "killed/curves.png").exists()

    config.train.epochs = 3  # the same output directory again: only the new epoch runs
    again = train_with_ray(config, threads_per_worker=1)
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3]
    assert again["history"][2]["resumed_from_epoch"] == 2


@pytest.fixture(scope="module")
def one_process_group():
    """A one-process gloo group for DeepSpeed engines built in this process (DeepSpeed keeps a handle
    on the first group it sees, so the group lives as long as the module's tests)."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", DS_ACCELERATOR="cpu", LOCAL_RANK="0", RANK="0",
                      WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("clipping", [0.0, 0.5])
def test_deepspeed_steps_update_the_weights_as_the_plain_loop_does(one_process_group, small_root, clipping):
    """Three engine steps equal tmr.train's three, with and without clipping. Unclipped, every
    step's gradient norm is above DeepSpeed's default threshold of 1.0, so a hidden default would
    show: Adam is scale-free on its first step only, and the clip factor changes from step to step.

    Seven biases get no gradient here, only rounding noise (~1e-8 against >= 1e-4 for every other
    parameter): each shifts every row of a modality equally, which attention's softmax (key
    biases) or the head's per-modality BatchNorm (the rest) cancels exactly; with the adversarial
    term off nothing else reads them. Adam would divide that noise by its own size and take full
    steps on it, so their values, and through them the rest at the 1e-3 level, would depend on a
    CPU's summation order rather than on DeepSpeed (CI's CPU differed from this machine's by
    2e-3 of an update). They are named, then frozen in both runs, and every other parameter must
    take the plain loop's update to 1e-4 of its size."""
    import copy

    from tmr.data import MoleculeTextDataset, PairCollator
    from tmr.distributed import build_engine, engine_backward
    from tmr.losses import AlignmentLoss
    from tmr.model import create_model
    from tmr.train import make_optimizer

    config = load_config("tiny", ["train.lr=0.05", "loss.adversarial_weight=0",
                                  f"train.gradient_clipping={clipping}"])
    torch.manual_seed(0)
    plain = create_model(config.model)
    dataset = MoleculeTextDataset(small_root / "validation.txt", progress=False)
    collate = PairCollator(plain.tokenizer, config.model.text.max_length)
    batches = [collate([dataset[i] for i in range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)]) for s in range(3)]
    criterion = AlignmentLoss(config.loss)
    plain.train()
    shift_only = set()
    for batch in batches:
        plain.zero_grad(set_to_none=True)
        criterion(plain(batch), None, plain.logit_scale)["loss"].backward()
        shift_only |= {name for name, p in plain.named_parameters()
                       if p.grad is not None and p.grad.norm() / p.numel() ** 0.5 < 1e-6}
    plain.zero_grad(set_to_none=True)
    assert shift_only == {"text_encoder.norm.bias", "molecule_encoder.norm.bias", "projector.key.bias",
                          "projector.value.bias", "projector.out.bias", "head.linear.bias",
                          "text_encoder.backbone.encoder.layer.5.attention.self.key.bias"}, shift_only
    for name, p in plain.named_parameters():
        if name in shift_only:
            p.requires_grad_(False)
    model, initial = copy.deepcopy(plain), copy.deepcopy(plain)
    optimizer, scheduler = make_optimizer(plain, config.train, 10)
    norms = []
    for batch in batches:  # tmr.train.fit's step
        optimizer.zero_grad(set_to_none=True)
        criterion(plain(batch), None, plain.logit_scale)["loss"].backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in plain.parameters() if p.grad is not None])))
        if clipping > 0:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), clipping)
        optimizer.step()
        scheduler.step()
    assert min(norms) > max(1.0, clipping), norms  # every step is one a clip would change
    engine, _, _ = build_engine(model, config, steps_per_epoch=10, world_size=1, use_gpu=False)
    engine.train()
    for batch in batches:
        engine_backward(engine, criterion(engine(batch), None, engine.module.logit_scale)["loss"], 1)
        engine.step()
    for (name, expected), got, start in zip(plain.named_parameters(), engine.module.parameters(), initial.parameters()):
        update = (expected - start).detach().norm()  # zero for the frozen backbone and the seven biases
        assert float((got - expected).detach().norm()) <= 1e-4 * float(update), name
