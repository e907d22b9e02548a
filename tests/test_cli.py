"""End to end through the command line on a tiny run, and the CLI's answers to mistakes."""
import json

import pytest

from clipcl.cli import main
from clipcl.report import RESULTS_SCHEMA
from clipcl.evaluate import metrics

TINY = ["scenario.train_per_class=40", "scenario.test_per_class=20", "scenario.n_tasks=2",
        "optim.epochs=1", "optim.batch_size=16", "memory.per_class=3", "eval.batch_size=64"]


@pytest.fixture(scope="module")
def gdro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "gdro"
    assert main(["run", "fmnist-cil", *TINY, "method.name=gdro", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_file_is_complete_and_consistent(gdro_run):
    out, r = gdro_run
    assert r["complete"] is True
    assert r["config"]["method"]["name"] == "gdro" and r["config"]["memory"]["per_class"] == 3
    R = r["accuracy_matrix"]
    assert len(R) == 2 and R[0][1] is None and all(0 <= v <= 1 for row in R for v in row if v is not None)
    assert r["metrics"] == metrics(R, r["scenario"]["test_sizes"], r["accuracy_before_training"])
    before = r["accuracy_before_training"]
    assert len(before) == 2 and all(0 <= v <= 1 for v in before)
    assert r["scenario"]["test_sizes"] == [40, 40] and r["scenario"]["train_sizes"] == [80, 80]
    # 4 classes seen, 3 grey 28x28 images each
    assert r["memory"]["images"] == 12 and r["memory"]["bytes"] == 12 * 28 * 28
    assert set(r["versions"]) >= {"python", "torch", "open_clip", "clipcl", "device", "world_size"}
    assert r["schema_version"] == RESULTS_SCHEMA
    assert len(r["timing"]["tasks"]) == 2 and r["timing"]["train_images_per_second"] > 0
    # telemetry: a weight vector over the seen classes at every step, summing to 1
    w = r["class_weights"]
    steps = sum(t["steps"] for t in r["timing"]["tasks"])
    assert len(w) == steps and len(w[-1]["weights"]) == 4
    assert sum(w[-1]["weights"]) == pytest.approx(1.0, abs=1e-4)
    csv = (out / "accuracy_matrix.csv").read_text().splitlines()
    assert csv[0] == "after_task,task1,task2"
    assert float(csv[2].split(",")[2]) == pytest.approx(R[1][1], abs=1e-4)
    for png in ("accuracy.png", "accuracy_matrix.png", "class_weights.png"):
        assert (out / png).stat().st_size > 1000


def test_same_seed_same_result_other_seed_differs(gdro_run, tmp_path):
    _, first = gdro_run
    assert main(["run", "fmnist-cil", *TINY, "method.name=gdro", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["accuracy_matrix"] == first["accuracy_matrix"]
    assert main(["run", "fmnist-cil", *TINY, "method.name=gdro", "seed=5", "--out", str(tmp_path / "s5")]) == 0
    other = json.loads((tmp_path / "s5" / "results.json").read_text())
    assert other["class_weights"] != first["class_weights"]


def test_zeroshot_trains_nothing_and_keeps_no_memory(tmp_path):
    assert main(["run", "fmnist-cil", *TINY, "method.name=zeroshot", "--out", str(tmp_path / "z")]) == 0
    r = json.loads((tmp_path / "z" / "results.json").read_text())
    assert r["memory"]["images"] == 0 and all(t["steps"] == 0 for t in r["timing"]["tasks"])


@pytest.mark.parametrize("argv, words", [
    (["run", "fmnist-cil", "method.name=bogus"], ["method.name", "bogus", "finetune", "gdro"]),
    (["run", "fmnist-cil", "memory.per_clas=5"], ["memory.per_clas", "memory.per_class"]),
    (["run", "fmnist-cil", "memory.per_class=-2"], ["memory.per_class", "-2"]),
    (["run", "fmnist-cil", "optim.lr=fast"], ["optim.lr", "fast", "number"]),
    (["run", "fmnist-cil", "scenario.dataset=mnist"], ["scenario.dataset", "fashion_mnist"]),
    (["run", "fmnist-cil", "model.name=ViT-Q-99"], ["model.name", "ViT-Q-99", "clipcl-tiny-rn"]),
    (["run", "no-such-benchmark"], ["no-such-benchmark", "fmnist-cil"]),
    (["run", "fmnist-cil", "method.dro=chi2"], ["method.dro", "kl", "groupdro", "cvar", "none"]),
])
def test_cli_errors_are_one_clear_paragraph(argv, words, tmp_path, capsys):
    code = main([*argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.startswith("clipcl: error:")
    for w in words:
        assert w in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_list_names_everything(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("zeroshot", "finetune", "er", "gcl", "gdro", "joint", "fashion_mnist", "fmnist-cil",
                 "clipcl-tiny-rn"):
        assert word in out


def test_partial_results_are_written_after_each_task(tmp_path):
    from clipcl.config import load_config
    from clipcl.engine import Trainer

    trainer = Trainer(load_config("fmnist-cil", [*TINY, "method.name=er"]), tmp_path, progress_bar=False)
    trainer._run_task(0)
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["complete"] is False and len(partial["accuracy_matrix"]) == 1
    assert partial["metrics"]["last_accuracy"] == pytest.approx(partial["accuracy_matrix"][0][0])


def test_report_compares_finished_runs(gdro_run, tmp_path, capsys):
    out, r = gdro_run
    assert main(["report", str(out), "--plot", str(tmp_path / "cmp.png")]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| gdro |"))
    assert f"| {100 * r['metrics']['last_accuracy']:.1f} |" in row
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert main(["report", str(tmp_path / "nothing")]) == 2
