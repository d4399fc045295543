"""The plain training loop learns, writes a loadable model, and the CLI evaluates and embeds with it."""

import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch

from tmr.cli import main
from tmr.config import load_config
from tmr.data import load_splits
from tmr.model import create_model, from_pretrained
from tmr.train import evaluate, fit, seed_everything


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_root):
    out = tmp_path_factory.mktemp("run")
    config = load_config("tiny", [f"data={train_root}", f"output={out}", "train.epochs=6", "train.max_train_pairs=null",
                                  "train.batch_size=16", "train.lr=1e-3", "train.text_lr=2e-3", "train.warmup_steps=5"])
    # one thread, whatever earlier tests left: one seed and thread count train one model, so the run's
    # shape (its best epoch is its 5th, not its last: test_run_directory_...) holds in any test order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return config, fit(config, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_training_beats_an_untrained_model(trained, train_root):
    config, result = trained
    seed_everything(config.train.seed)
    untrained = evaluate(create_model(config.model), load_splits(train_root), pools=("split",))["split"]
    best = result["validation"]["split"]
    for direction in ("text_to_molecule", "molecule_to_text"):
        print(direction, best[direction]["mrr"], untrained[direction]["mrr"])
        # 100 candidates: chance is an MRR of about 5; six tiny epochs on 300 pairs reach about 30
        assert best[direction]["mrr"] > max(3 * untrained[direction]["mrr"], untrained[direction]["mrr"] + 15), (
            direction, best, untrained)
    full = result["validation"]["all"]  # no molecules.tsv here: every pair of every split present
    assert full["text_to_molecule"]["pool"] == full["molecule_to_text"]["pool"] == 400
    assert len(result["history"]) == 6


def test_run_directory_and_best_holds_the_best_epoch(trained, train_root):
    config, result = trained
    out = Path(config.output)
    assert (out / "curves.png").stat().st_size > 10_000
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == result["best_epoch"]
    history, best_epoch = result["history"], result["best_epoch"]
    assert best_epoch == max(history, key=lambda h: h["val_mrr"])["epoch"]
    assert best_epoch < len(history), "this check needs a run whose last epoch is not its best"
    best = from_pretrained(out / "best")
    assert best.config == config.model
    # best/ scores exactly what its epoch scored, and not what the last epoch scored
    scored = evaluate(best, load_splits(train_root), pools=("split",))["split"]
    record, last = history[best_epoch - 1], history[-1]
    for direction, key in (("text_to_molecule", "val_mrr_t2m"), ("molecule_to_text", "val_mrr_m2t")):
        assert scored[direction]["mrr"] == pytest.approx(record[key], abs=1e-6), direction
    assert (scored["text_to_molecule"]["mrr"], scored["molecule_to_text"]["mrr"]) != pytest.approx(
        (last["val_mrr_t2m"], last["val_mrr_m2t"]), abs=1e-3)


def test_cli_eval_prints_the_metrics_of_the_best_model(trained, train_root, capsys):
    config, result = trained
    assert main(["eval", "--model", f"{config.output}/best", "--data", str(train_root), "--split", "validation",
                 "--pool", "split"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["text_to_molecule"]["pool"] == printed["molecule_to_text"]["pool"] == 100
    assert printed["text_to_molecule"] == pytest.approx(result["validation"]["split"]["text_to_molecule"])
    assert main(["eval", "--model", f"{config.output}/best", "--data", str(train_root), "--split", "test"]) == 2
    assert "not in the data root" in capsys.readouterr().err


def test_cli_embed_writes_embeddings_with_ids_and_skips_bad_smiles(trained, tmp_path):
    config, _ = trained
    library = tmp_path / "library.tsv"
    library.write_text("id\tsmiles\nethanol\tCCO\nbroken\tC1CC\nbenzene\tc1ccccc1\n")
    out = tmp_path / "mols.npy"
    run = subprocess.run([sys.executable, "-m", "tmr.cli", "embed", "--model", f"{config.output}/best", "--input",
                          str(library), "--kind", "molecule", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "broken" in run.stderr and "C1CC" in run.stderr
    assert (tmp_path / "mols.ids.txt").read_text().split() == ["ethanol", "benzene"]
    model = from_pretrained(f"{config.output}/best")
    assert np.allclose(np.load(out), model.encode_molecule(["CCO", "c1ccccc1"]).numpy(), atol=1e-6)
    texts = tmp_path / "texts.txt"
    texts.write_text("The molecule is an alcohol.\n\nThe molecule is an arene.\n")
    assert main(["embed", "--model", f"{config.output}/best", "--input", str(texts), "--kind", "text",
                 "--out", str(tmp_path / "texts.npy")]) == 0
    embedded = np.load(tmp_path / "texts.npy")
    assert embedded.shape == (2, 64)
    assert torch.allclose(torch.from_numpy(embedded), model.encode_text(["The molecule is an alcohol.",
                                                                         "The molecule is an arene."]), atol=1e-6)


def test_cli_eval_select_matches_the_run(trained, train_root, capsys):
    config, result = trained
    assert main(["eval", "--model", f"{config.output}/best", "--data", str(train_root), "--split", "select"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["molecule_to_text"]["pool"] == 400 and printed["data"] == "ChEBI-20"
    assert printed["molecule_to_text"] == pytest.approx(result["validation"]["all"]["molecule_to_text"])


STEP_FAULTS = """
import resource, sys, torch
from tmr.config import load_config
from tmr.data import MoleculeTextDataset, PairCollator
from tmr.losses import AlignmentLoss
from tmr.model import create_model
from tmr.train import keep_freed_memory, make_optimizer
torch.set_num_threads(1)  # one arena: worker threads' own arenas would add their first-use faults
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
root = sys.argv[2]
config = load_config("cpu", [f"model.molecule.mol2vec_path={root}/../mol2vec/tokens.npz"])
torch.manual_seed(0)
model = create_model(config.model).train()
items = [MoleculeTextDataset(f"{root}/validation.txt", progress=False)[i] for i in range(128)]
collate = PairCollator(model.tokenizer, 256, model.text_encoder.backbone_states([i.text for i in items], 256))
criterion, (optimizer, _) = AlignmentLoss(config.loss), make_optimizer(model, config.train, 10)
faults = []
for step in range(4):  # the main job's step on cached text states, batches of 128 in different orders
    batch = collate(items[step * 32:] + items[:step * 32])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    optimizer.zero_grad()
    criterion(model(batch), None, model.logit_scale)["loss"].backward()
    optimizer.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(faults[1:]))
"""


def test_training_steps_reuse_freed_memory_instead_of_faulting_it_in(chebi_root):
    """After its first step, a `cpu` training step takes far fewer pages from the kernel: glibc keeps
    what the previous step freed (tmr.train.keep_freed_memory, called by every training loop) instead
    of handing it back and faulting it in again (measured over 3 steps: 0-40,000 pages against
    130,000-145,000 by default; a step 0.31 -> 0.21 s)."""
    counts = {}
    for mode in ("default", "keep"):
        result = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode, str(chebi_root)], capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        kept, faults = result.stdout.split()[-2:]
        counts[mode] = int(faults)
    assert kept == "True"
    assert counts["default"] > 60_000 and counts["keep"] < counts["default"] / 2.5, counts
