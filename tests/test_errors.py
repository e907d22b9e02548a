"""User mistakes and broken runs: one clear message naming the key, file or step, a non-zero exit code, no
traceback, and nothing lost (an old run is never deleted for a config that turns out invalid; the last good
checkpoint is kept when the loss goes non-finite)."""
import json
import shutil

import pytest
import torch

from clipcl import checkpoint
from clipcl.cli import main
from cli_checks import fail
from clipcl.config import load_config
from clipcl.data import datasets
from clipcl.engine import Trainer
from clipcl.methods import GDRO

# 1 task of 2 classes, 3 steps of 16 new + 16 memory images: a whole run takes a few seconds
TINY = ["scenario.train_per_class=20", "scenario.test_per_class=10", "scenario.n_tasks=1", "optim.epochs=1",
        "optim.batch_size=16", "method.name=gdro", "memory.per_class=2", "eval.batch_size=64"]
ZEROSHOT = [*TINY, "method.name=zeroshot"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run (zeroshot: no training, but the same checkpoints) to break and resume."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "fmnist-cil", *ZEROSHOT, "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------- config, before any work
@pytest.mark.parametrize("overrides, words", [
    # unknown keys, with the closest valid key
    (["checkpoint_evry=2"], ["unknown config key 'checkpoint_evry'", "Did you mean 'checkpoint_every'"]),
    (["optim.batchsize=8"], ["'optim.batchsize'", "'optim.batch_size'", "clipcl list keys"]),
    (["scenario.n_task=2"], ["'scenario.n_task'", "'scenario.n_tasks'"]),
    # wrong types
    (["optim.batch_size=abc"], ["optim.batch_size", "'abc'", "whole number"]),
    (["optim.batch_size=2.5"], ["optim.batch_size", "2.5", "whole number"]),
    (["skip_nonfinite=maybe"], ["skip_nonfinite", "true or false"]),
    (["optim.lr=[1, 2]"], ["optim.lr", "number"]),
    (["scenario.classes=a,b"], ["scenario.classes", "whole number"]),
    (["noequals"], ["noequals", "key=value"]),
    # impossible values
    (["memory.per_class=-1"], ["memory.per_class", "-1", "0 or more"]),
    (["memory.total=-10"], ["memory.total", "-10"]),
    (["optim.batch_size=1"], ["optim.batch_size", "at least 2"]),
    (["optim.lr=0"], ["optim.lr", "positive"]),
    (["method.gamma=1.5"], ["method.gamma", "(0, 1]"]),
    (["scenario.classes=[0, 0, 1]"], ["scenario.classes", "repeated"]),
    (["checkpoint_every=-1"], ["checkpoint_every", "-1"]),
    # impossible for the dataset: checked when the scenario is built, before training or touching --out
    (["scenario.classes_per_task=11"], ["scenario.classes_per_task", "11", "only 10 classes"]),
    (["scenario.classes=[0, 3, 10]"], ["scenario.classes", "[10]", "[0, 10)"]),
    (["scenario.classes=[-1, 2]"], ["scenario.classes", "[-1]"]),
    (["scenario.n_tasks=6"], ["scenario.n_tasks", "6", "only 5 tasks"]),
    (["scenario.initial_classes=12"], ["12 classes", "scenario.initial_classes"]),
    (["scenario.kind=dil"], ["scenario.kind", "no domains"]),
    (["model.pretrained=no-such-tag"], ["model.pretrained", "no-such-tag"]),
    (["method.dro=groupdro", "method.dro_adjust=1"], ["method.dro_adjust", "dro=groupdro"]),
    (["method.gcl_form=pairs", "method.dro_signal=t2i"], ["method.dro_signal", "gcl_form=prompts"]),
    (["method.lam=1", "method.lam_start=0.5"], ["method.lam_start", "above method.lam"]),
    (["method.dro=none", "method.lam_start=8"], ["method.lam_start", "dro=none"]),
    (["method.gcl_form=global"], ["method.gcl_form", "pairs, prompts"]),
])
def test_bad_config_is_one_message_and_no_output(overrides, words, tmp_path, capsys):
    out = tmp_path / "out"
    err = fail(["run", "fmnist-cil", *overrides, "--out", str(out)], capsys)
    for w in words:
        assert w in err, err
    assert not out.exists()


def test_unknown_key_in_a_config_file_names_the_file(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("seed: 1\noptim:\n  lr: 0.1\n  wieght_decay: 0.1\n")
    err = fail(["run", str(path), "--out", str(tmp_path / "out")], capsys)
    assert str(path) in err and "'optim.wieght_decay'" in err and "'optim.weight_decay'" in err


def test_missing_data_root_is_reported_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CLIPCL_DATA", raising=False)
    err = fail(["run", "fmnist-cil", "scenario.root=/nonexistent", "scenario.download=false",
                "--out", str(tmp_path / "out")], capsys)
    assert "scenario.root" in err and "/nonexistent" in err and "no such folder" in err
    assert not (tmp_path / "out").exists()


def test_dataset_files_absent_everywhere(tmp_path, monkeypatch, capsys):
    """An existing but empty data folder, no $CLIPCL_DATA, no system copy, no download: the loader says where it looked."""
    monkeypatch.delenv("CLIPCL_DATA", raising=False)
    monkeypatch.setattr(datasets, "FMNIST_SYSTEM_DIR", tmp_path / "no-system-copy")
    empty = tmp_path / "data"
    empty.mkdir()
    err = fail(["run", "fmnist-cil", f"scenario.root={empty}", "scenario.download=false",
                "--out", str(tmp_path / "out")], capsys)
    assert "Fashion-MNIST not found" in err and str(empty) in err and "scenario.download is false" in err


# ---------------------------------------------------------------------- the output folder
def test_non_empty_out_refused_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("old results")
    err = fail(["run", "fmnist-cil", *TINY, "--out", str(out)], capsys)
    assert "not empty and holds no clipcl run" in err and "choose another --out" in err and str(out) in err
    assert (out / "precious.txt").read_text() == "old results"


def test_non_empty_run_folder_suggests_resume_or_overwrite(finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    err = fail(["run", "fmnist-cil", *TINY, "--out", str(out)], capsys)
    assert "is not empty" in err and "--resume" in err and "--overwrite" in err and str(out) in err


def test_overwrite_with_an_invalid_config_keeps_the_old_run(tmp_path, capsys):
    """The scenario and model are built (and found wrong) before --overwrite deletes anything."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("old results")
    for bad in (["scenario.classes=[0, 99]"], ["scenario.n_tasks=9"], ["model.name=ViT-Q-99"]):
        fail(["run", "fmnist-cil", *TINY, *bad, "--out", str(out), "--overwrite"], capsys)
        assert (out / "precious.txt").read_text() == "old results"


def test_overwrite_replaces_a_finished_run(finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    (out / "notes.txt").write_text("the user's own file")
    assert main(["run", "fmnist-cil", *ZEROSHOT, "seed=3", "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "the user's own file"  # clipcl removes only what it wrote
    assert "kept 1 entry" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 3


def test_resume_without_checkpoint(tmp_path, capsys):
    err = fail(["run", "fmnist-cil", *TINY, "--out", str(tmp_path / "nothing"), "--resume"], capsys)
    assert "nothing to resume" in err and "without --resume" in err


# ---------------------------------------------------------------------- unreadable checkpoints
def broken_copy(finished_run, tmp_path, breaker):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    path = out / checkpoint.CHECKPOINT_NAME
    breaker(path)
    return out, path


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _other_version(path):
    state = torch.load(path, weights_only=False)
    torch.save({**state, "format_version": 99}, path)


def _not_a_checkpoint(path):
    torch.save(torch.zeros(3), path)


@pytest.mark.parametrize("breaker, words", [
    (_truncate, ["unreadable", "truncated or corrupt"]),
    (lambda p: p.write_bytes(b""), ["unreadable"]),
    (_other_version, ["format version 99", f"reads version {checkpoint.FORMAT_VERSION}"]),
    (_not_a_checkpoint, ["not a clipcl checkpoint"]),
])
def test_unreadable_checkpoint_names_the_file_and_why(breaker, words, finished_run, tmp_path, capsys):
    out, path = broken_copy(finished_run, tmp_path, breaker)
    before = path.read_bytes()
    err = fail(["run", "fmnist-cil", *ZEROSHOT, "--out", str(out), "--resume"], capsys)
    assert str(path) in err
    for w in words:
        assert w in err, err
    assert path.read_bytes() == before  # left as it was, for the user to inspect


def test_checkpoint_of_another_config_is_refused_with_the_difference(finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    err = fail(["run", "fmnist-cil", *ZEROSHOT, "optim.lr=0.5", "memory.per_class=4", "--out", str(out), "--resume"],
               capsys)
    assert str(out / checkpoint.CHECKPOINT_NAME) in err and "another config" in err
    assert "optim.lr: checkpoint 0.002, now 0.5" in err and "memory.per_class: checkpoint 2, now 4" in err


# ---------------------------------------------------------------------- non-finite losses
def test_nonfinite_loss_stops_naming_step_and_terms_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    err = fail(["run", "fmnist-cil", *TINY, "optim.lr=1e30", "checkpoint_every=1", "--out", str(out)], capsys,
               code=3)
    assert "non-finite loss at task 0 step 1" in err and "gcl_loss=nan" in err and "skip_nonfinite=true" in err
    assert not (out / "results.json").exists()
    state = checkpoint.load(out / checkpoint.CHECKPOINT_NAME)  # the checkpoint before the failing step
    assert (state["progress"]["task"], state["progress"]["step"]) == (0, 1)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skip_nonfinite_counts_skipped_batches(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "fmnist-cil", *TINY, "optim.lr=1e30", "skip_nonfinite=true", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    # the first step blows the weights up (finite); every later batch is non-finite and skipped
    assert r["nonfinite_skipped"] == r["timing"]["tasks"][0]["steps"] - 1 == 2


def test_skipped_batch_leaves_estimators_untouched(tmp_path, monkeypatch):
    """A nan batch must not poison the moving averages: the method state is rolled back, the batch counted."""
    real_loss = GDRO.loss

    def poisoned_loss(self, batch):
        terms = real_loss(self, batch)
        if batch.step == 1:
            self.gcl.log_u1.fill_(float("nan"))  # what a nan embedding does to the estimators
            self.dro.v.fill_(float("nan"))
            return {**terms, "gcl_loss": terms["gcl_loss"] * float("nan")}
        return terms

    monkeypatch.setattr(GDRO, "loss", poisoned_loss)
    cfg = load_config("fmnist-cil", [*TINY, "skip_nonfinite=true"])
    trainer = Trainer(cfg, tmp_path / "out", progress_bar=False)
    results = trainer.run()
    assert results["nonfinite_skipped"] == 1
    state = trainer.method.state_dict()
    assert torch.isfinite(state["gcl"]["log_u1"]).all() and torch.isfinite(state["dro"]["v"]).all()
    assert [w["step"] for w in results["class_weights"]] == [0, 2]  # no telemetry of the skipped step
    assert all(torch.isfinite(p).all() for p in trainer.bundle.model.parameters())


def test_skipped_batch_restores_batchnorm_statistics(tmp_path, monkeypatch):
    """A nan forward has already written its batch statistics into BatchNorm buffers: a skip undoes that."""
    from clipcl.methods import ER

    real = ER.training_forward

    def poisoned(self, model, images, labels, index, step):
        terms = real(self, model, images, labels, index, step)
        if step == 1:
            bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_mean.fill_(float("nan"))
            return {k: v * float("nan") for k, v in terms.items()}
        return terms

    monkeypatch.setattr(ER, "training_forward", poisoned)
    cfg = load_config("fmnist-cil", [*TINY, "method.name=er", "skip_nonfinite=true"])
    trainer = Trainer(cfg, tmp_path / "out", progress_bar=False, quiet=True)
    results = trainer.run()
    assert results["nonfinite_skipped"] == 1
    norms = [m for m in trainer.bundle.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all() for m in norms)


def test_random_streams_of_different_key_counts_differ():
    """(seed, task, 2) and (seed, task, 2, 0) once gave the same generator (SeedSequence pads with zeros)."""
    from clipcl.sampling import seeded

    a = torch.randperm(50, generator=seeded(0, 1, 2))
    b = torch.randperm(50, generator=seeded(0, 1, 2, 0))
    assert not torch.equal(a, b)
    assert torch.equal(a, torch.randperm(50, generator=seeded(0, 1, 2)))


@pytest.mark.parametrize("overrides, words", [
    (["method.dro=none", "method.dro_signal=excess"], ["method.dro_signal", "dro=none"]),
    (["model.lock_image=true"], ["model.lock_image", "lock_text"]),  # fmnist-cil locks the text tower
])
def test_settings_without_effect_are_refused(overrides, words, tmp_path, capsys):
    err = fail(["run", "fmnist-cil", *overrides, "--out", str(tmp_path / "out")], capsys)
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out").exists()


def test_bench_under_several_ranks_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = fail(["bench", "fmnist-cil"], capsys)
    assert "without torchrun" in err
