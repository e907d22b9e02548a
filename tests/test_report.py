"""clipcl report and the run's output files: unreadable results, labels, warnings, incomplete runs, links."""
import json
from pathlib import Path

import pytest

from clipcl.cli import main
from clipcl.evaluate import metrics
from clipcl.report import collect_runs, load_results, plot_comparison, summary_table, write_outputs
from cli_checks import fail

# Two tasks of 10 test images each. Seen accuracy: 0.8 after task 0, (0.6 + 0.9) / 2 = 0.75 after task 1.
R2 = [[0.8, None], [0.6, 0.9]]
HAND = {"avg_incremental_accuracy": 0.775, "last_accuracy": 0.75, "forgetting": 0.2, "backward_transfer": -0.2}
ROW2 = "| 77.5 | 75.0 | 20.0 | -20.0 | 80.0 | 85.0 | 8 / 6 | 900 | 1 |"


def make_results(R=R2, n_tasks=2, complete=True, order_hash="0cfdc74c6734c3f0", dataset="fashion_mnist",
                 per_class=2, total=0, weights=False) -> dict:
    """A results.json as clipcl run writes it, with the parts report reads."""
    sizes = [10] * n_tasks
    r = {
        "complete": complete,
        "config": {"method": {"name": "gdro"},
                   "scenario": {"dataset": dataset, "kind": "cil", "classes_per_task": 2, "initial_classes": 0,
                                "n_tasks": n_tasks, "class_order": "seeded"},
                   "memory": {"per_class": per_class, "total": total, "selection": "random"}},
        "scenario": {"kind": "cil", "classnames": [f"c{i}" for i in range(2 * n_tasks)], "class_order_hash": order_hash,
                     "tasks": [f"task{t}:c{2 * t},c{2 * t + 1}" for t in range(n_tasks)], "test_sizes": sizes},
        "accuracy_matrix": R,
        "metrics": metrics(R, sizes),
        "timing": {"train_seconds": 1.2, "train_images_per_second": 900.0},
        "memory": {"images": 8, "bytes": 6144},
    }
    if weights:
        r["class_weights"] = [{"task": 0, "step": 0, "weights": [0.6, 0.4]},
                              {"task": 1, "step": 0, "weights": [0.2, 0.3, 0.1, 0.4]}]
    return r


def write_run(folder: Path, results: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results or make_results()))
    return folder


def report(capsys, *args) -> tuple[int, str, str]:
    rc = main(["report", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(err: str, *names) -> None:
    """A user mistake: one line, no traceback, naming what is wrong."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipcl: error:"), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0]


def row_of(table: str, label: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| {label} |"))


def test_hand_computed_metrics_match_clipcl():
    assert make_results()["metrics"] == pytest.approx({**HAND, "future_accuracy": None})


def test_report_of_a_complete_run(tmp_path, capsys):
    run = write_run(tmp_path / "gdro")
    rc, out, err = report(capsys, run)
    assert rc == 0 and err == ""
    assert out.splitlines()[0] == ("| method | avg inc. acc. | last acc. | forgetting | BWT | min diag | mean diag "
                                   "| memory (img / KiB) | train img/s | train s |")
    assert row_of(out, "gdro") == "| gdro " + ROW2


BAD_FILES = {
    "empty": (b"", "is empty"),
    "blank": (b" \n\t\n", "is empty"),
    "garbage bytes": (bytes(range(128, 256)) * 4, "not UTF-8"),
    "invalid JSON": (b'{"config": {}, "accuracy_matrix": [', "not valid JSON"),
    "JSON list": (b"[1, 2, 3]", "an array"),
    "JSON string": (b'"results"', "a string"),
    "missing keys": (json.dumps({"config": {}, "scenario": {}}).encode(), "'accuracy_matrix', 'metrics'"),
    "matrix not rows": (json.dumps({**make_results(), "accuracy_matrix": [0.5, 0.7]}).encode(), "accuracy_matrix"),
    "row too short": (json.dumps({**make_results(), "accuracy_matrix": [[0.5]]}).encode(), "accuracy_matrix"),
    "scenario without tasks": (json.dumps({**make_results(), "scenario": {"kind": "cil"}}).encode(), "tasks"),
}


@pytest.mark.parametrize("content, reason", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_unreadable_results_are_one_line_naming_the_file(tmp_path, capsys, content, reason):
    good = write_run(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_bytes(content)
    rc, out, err = report(capsys, good, bad)
    assert rc == 2 and out == ""
    assert_one_error_line(err, bad / "results.json", reason)


@pytest.mark.parametrize("content, reason", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_load_results_raises_config_error(tmp_path, content, reason):
    from clipcl.config import ConfigError

    (tmp_path / "results.json").write_bytes(content)
    with pytest.raises(ConfigError, match="clipcl run"):
        load_results(tmp_path / "results.json")


def test_a_results_file_may_be_given_directly(tmp_path, capsys):
    run = write_run(tmp_path / "er")
    rc, out, _ = report(capsys, run / "results.json")
    assert rc == 0 and row_of(out, "er") == "| er " + ROW2


@pytest.mark.parametrize("make", ["empty folder", "missing"])
def test_a_path_without_results_is_named(tmp_path, capsys, make):
    path = tmp_path / "nothing"
    if make == "empty folder":
        path.mkdir()
    rc, out, err = report(capsys, write_run(tmp_path / "good"), path)
    assert rc == 2 and out == ""
    assert_one_error_line(err, path)


def test_plot_into_a_missing_folder_is_refused(tmp_path, capsys):
    plot = tmp_path / "missing_dir" / "x.png"
    rc, out, err = report(capsys, write_run(tmp_path / "gdro"), "--plot", plot)
    assert rc == 2 and out == ""
    assert_one_error_line(err, plot, "create the folder")
    assert not plot.parent.exists()


def test_plot_onto_a_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "plots"
    folder.mkdir()
    rc, out, err = report(capsys, write_run(tmp_path / "gdro"), "--plot", folder)
    assert rc == 2 and out == ""
    assert_one_error_line(err, folder, "is a folder")
    assert list(folder.iterdir()) == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failure", ["bad run", "missing run", "plot folder missing", "plot onto folder"])
def test_a_failing_report_changes_no_file(tmp_path, capsys, failure):
    write_run(tmp_path / "a" / "gdro")
    write_run(tmp_path / "b" / "gdro")
    (tmp_path / "b" / "gdro" / "accuracy.png").write_bytes(b"old plot")
    (tmp_path / "cmp.png").write_bytes(b"an earlier comparison")
    args = [tmp_path / "a" / "gdro", tmp_path / "b" / "gdro", "--plot", tmp_path / "cmp.png"]
    if failure == "bad run":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "results.json").write_text("{")
        args.insert(0, tmp_path / "bad")
    elif failure == "missing run":
        args.insert(0, tmp_path / "nothing")
    elif failure == "plot folder missing":
        args[-1] = tmp_path / "nothing" / "cmp.png"
    else:
        args[-1] = tmp_path / "b"
    before = snapshot(tmp_path)
    rc, out, err = report(capsys, *args)
    assert rc == 2 and out == ""
    assert_one_error_line(err)
    assert snapshot(tmp_path) == before


def test_incomplete_run_is_marked(tmp_path, capsys):
    run = write_run(tmp_path / "gdro", make_results(R=[[0.7, None, None, None, None]], n_tasks=5, complete=False))
    rc, out, _ = report(capsys, run)
    assert rc == 0
    assert row_of(out, "gdro (incomplete: 1/5 tasks)").startswith("| gdro (incomplete: 1/5 tasks) | 70.0 | 70.0 |")


def test_run_without_rows_shows_dashes_and_plots(tmp_path, capsys):
    empty = write_run(tmp_path / "gdro", make_results(R=[], n_tasks=5, complete=False))
    done = write_run(tmp_path / "er")
    plot = tmp_path / "cmp.png"
    rc, out, err = report(capsys, empty, done, "--plot", plot)
    assert rc == 0
    assert row_of(out, "gdro (incomplete: 0/5 tasks)") == ("| gdro (incomplete: 0/5 tasks) | - | - | - | - | - | - "
                                                          "| 8 / 6 | 900 | 1 |")
    assert row_of(out, "er") == "| er " + ROW2
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_plot_comparison_of_runs_without_rows_only(tmp_path):
    plot_comparison({"gdro": make_results(R=[], complete=False)}, tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").read_bytes().startswith(b"\x89PNG")


def test_summary_table_of_a_run_without_rows_or_metrics():
    r = make_results(R=[], complete=False)
    assert r["metrics"] == {}
    assert "| gdro (incomplete: 0/2 tasks) | - | - | - | - | - | - |" in summary_table({"gdro": r})


@pytest.mark.parametrize("folders, labels", [
    (["a/gdro", "b/gdro"], ["a/gdro", "b/gdro"]),
    (["x/a/gdro", "y/a/gdro", "z/b/gdro"], ["x/a/gdro", "y/a/gdro", "b/gdro"]),
    (["a/gdro", "b/er"], ["gdro", "er"]),
    (["a/gdro", "a/gdro"], ["gdro"]),  # the same run given twice is one run (one row), with a note on stderr
])
def test_runs_sharing_a_name_get_distinct_labels(tmp_path, capsys, folders, labels):
    for f in set(folders):
        write_run(tmp_path / f)
    rc, out, _ = report(capsys, *(tmp_path / f for f in folders))
    assert rc == 0
    for label in labels:
        assert row_of(out, label) == f"| {label} " + ROW2
    assert len(out.strip().splitlines()) == 2 + len(labels)


def test_labels_from_relative_paths(tmp_path, monkeypatch):
    write_run(tmp_path / "a" / "gdro")
    write_run(tmp_path / "b" / "gdro")
    monkeypatch.chdir(tmp_path / "a" / "gdro")
    runs, _ = collect_runs([".", "../../b/gdro/results.json"])
    assert list(runs) == ["a/gdro", "b/gdro"]


DIFFERENCES = {
    "class order": ({"order_hash": "ffff000011112222"}, ["class_order_hash", "0cfdc74c6734c3f0", "ffff000011112222"]),
    "dataset": ({"dataset": "cifar100"}, ["benchmarks", "dataset=fashion_mnist", "dataset=cifar100"]),
    "task count": ({"n_tasks": 3, "R": [[0.8, None, None]]}, ["benchmarks", "n_tasks=2", "n_tasks=3", "3 tasks"]),
    "memory per class": ({"per_class": 20}, ["memory sizes", "per_class=2", "per_class=20"]),
    "memory total": ({"total": 200}, ["memory sizes", "per_class=2", "total=200"]),
}


@pytest.mark.parametrize("change, expected", DIFFERENCES.values(), ids=DIFFERENCES.keys())
def test_runs_that_differ_are_warned_about(tmp_path, capsys, change, expected):
    write_run(tmp_path / "a")
    write_run(tmp_path / "b")
    write_run(tmp_path / "c", make_results(**change))
    rc, out, err = report(capsys, tmp_path / "a", tmp_path / "b", tmp_path / "c")
    assert rc == 0 and row_of(out, "a") and row_of(out, "c")
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipcl: warning: "), err
    for text in expected:
        assert text in lines[0]
    assert " in a, b" in lines[0] and " in c" in lines[0]


def test_agreeing_runs_are_not_warned_about(tmp_path, capsys):
    write_run(tmp_path / "a" / "gdro", make_results(per_class=5, total=100))
    write_run(tmp_path / "b" / "gdro", make_results(per_class=10, total=100))  # the total overrides per_class
    write_run(tmp_path / "er", make_results(R=[[0.5, None], [0.2, 0.9]], total=100))
    rc, out, err = report(capsys, tmp_path / "a" / "gdro", tmp_path / "b" / "gdro", tmp_path / "er")
    assert rc == 0 and err == ""
    assert len(out.strip().splitlines()) == 5


def test_report_writes_the_plot_through_no_link(tmp_path, capsys):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not yours")
    plot = tmp_path / "plots" / "cmp.png"
    plot.parent.mkdir()
    plot.symlink_to(outside)
    rc, _, err = report(capsys, write_run(tmp_path / "gdro"), "--plot", plot)
    assert rc == 2 and "symbolic link" in err and outside.read_bytes() == b"not yours"
    assert plot.is_symlink()  # the link is the user's: neither written through nor replaced


def test_write_outputs_replaces_planted_links(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    names = ["results.json", "accuracy_matrix.csv", "accuracy.png", "accuracy_matrix.png", "class_weights.png"]
    for name in names:
        (elsewhere / name).write_bytes(b"precious " + name.encode())
        (run / name).symlink_to(elsewhere / name)
    results = make_results(weights=True)
    write_outputs(results, run)
    for name in names:
        assert (elsewhere / name).read_bytes() == b"precious " + name.encode()
        assert (run / name).is_file() and not (run / name).is_symlink()
    assert load_results(run / "results.json") == results
    assert (run / "accuracy_matrix.csv").read_text() == "after_task,task1,task2\n1,0.8000,\n2,0.6000,0.9000\n"
    assert all((run / n).read_bytes().startswith(b"\x89PNG") for n in names if n.endswith(".png"))
    assert sorted(p.name for p in run.iterdir()) == sorted(names)  # no temporary file left behind


def test_class_weight_rows_are_placed_at_their_training_steps():
    from clipcl.report import run_title, weight_steps

    results = {"class_weights": [{"task": 0, "step": 0, "weights": [1.0]}, {"task": 0, "step": 10, "weights": [1.0]},
                                 {"task": 1, "step": 0, "weights": [0.5, 0.5]},
                                 {"task": 1, "step": 10, "weights": [0.5, 0.5]}],
               "timing": {"tasks": [{"steps": 13}, {"steps": 13}]},
               "config": {"name": "fmnist-cil", "seed": 3, "method": {"name": "gdro"}, "memory": {"per_class": 2}}}
    x, first = weight_steps(results)
    assert x.tolist() == [0, 10, 13, 23] and first.tolist() == [0, 13, 26]  # telemetry every 10 steps, 13 a task
    assert run_title(results) == "fmnist-cil · gdro · m=2 · seed 3"
    results["timing"]["tasks"] = []  # stopped in its first task: rows as recorded
    assert weight_steps(results)[0].tolist() == [0, 1, 2, 3]


def test_results_of_every_known_schema_version_are_read_and_a_newer_one_is_refused(tmp_path, capsys):
    from clipcl.report import RESULTS_SCHEMA

    old = write_run(tmp_path / "old", make_results())  # written before schema_version existed: version 0
    new = write_run(tmp_path / "new", {**make_results(), "schema_version": RESULTS_SCHEMA})
    assert main(["report", str(old), str(new)]) == 0
    capsys.readouterr()
    future = write_run(tmp_path / "future", {**make_results(), "schema_version": RESULTS_SCHEMA + 1})
    err = fail(["report", str(future)], capsys)
    assert f"schema version {RESULTS_SCHEMA + 1}" in err and str(future / "results.json") in err
