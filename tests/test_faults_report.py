"""clipcl report given hostile inputs, as a user (or a stranger's results.json) would: each bad file ends with one
'clipcl: error:' line naming the file, the field and the value, exit 2, no traceback, and every file that existed
before unchanged, byte for byte.

Covers: accuracies and metrics that are not finite or out of range (NaN, inf, 1e308, -0.5, 1.5), strings and
booleans where numbers go, rows of the wrong length, negative or fractional counts; one run given three times
(a folder, its results.json, a link) counted once; config, method, folder and variant names holding HTML or
table breakers, escaped in report.md and on stdout (report.html stays escaped, plots do not choke on '$');
--out on a read-only or full file system; results.json that is a symbolic link loop, a link to nothing, a pipe
or unreadable.
"""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest

from clipcl import files
from clipcl.cli import main
from clipcl.report import collect_runs, markdown_text
from clipcl.summary import collect
from cli_checks import fail, snapshot
from test_report import make_results, write_run
from test_summary import MATRICES, md_tables, parse_html, run_results


def results_text(**changes) -> str:
    """A 2-task results.json as text, with changes applied to the parsed dict (dotted keys reach inside)."""
    r = json.loads(json.dumps(make_results()))  # a copy: make_results shares its default matrix
    for key, value in changes.items():
        *path, last = key.split(".")
        d = r
        for k in path:
            d = d[int(k)] if isinstance(d, list) else d[k]
        d[int(last) if isinstance(d, list) else last] = value
    return json.dumps(r)  # NaN and Infinity as Python's json writes (and reads) them


def write_raw(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(text)
    return folder


# ---------------------------------------------------------------------- numbers clipcl could not have written
NAN, INF = float("nan"), float("inf")
BAD_VALUES = {
    "NaN accuracy": (results_text(**{"accuracy_matrix.1.0": NAN}), ["accuracy_matrix[1][0]", "NaN", "[0, 1]"]),
    "inf accuracy": (results_text(**{"accuracy_matrix.0.0": INF}), ["accuracy_matrix[0][0]", "Infinity"]),
    "-inf accuracy": (results_text(**{"accuracy_matrix.1.1": -INF}), ["accuracy_matrix[1][1]", "-Infinity"]),
    "1e308 accuracy": (results_text(**{"accuracy_matrix.1.1": 1e308}), ["accuracy_matrix[1][1]", "1e+308"]),
    "1e400 parsed as inf": (results_text().replace('"accuracy_matrix": [[0.8', '"accuracy_matrix": [[1e400'),
                            ["accuracy_matrix[0][0]", "Infinity"]),
    "huge integer accuracy": (results_text().replace('"accuracy_matrix": [[0.8', '"accuracy_matrix": [[' + "9" * 400),
                              ["accuracy_matrix[0][0]", "999"]),
    "-0.5 accuracy": (results_text(**{"accuracy_matrix.1.0": -0.5}), ["accuracy_matrix[1][0]", "-0.5"]),
    "1.5 accuracy": (results_text(**{"accuracy_matrix.0.0": 1.5}), ["accuracy_matrix[0][0]", "1.5"]),
    "string accuracy": (results_text(**{"accuracy_matrix.1.0": "0.6"}), ["accuracy_matrix[1][0]", '"0.6"']),
    "boolean accuracy": (results_text(**{"accuracy_matrix.1.0": True}), ["accuracy_matrix[1][0]", "true"]),
    "row too long": (results_text(**{"accuracy_matrix.1": [0.6, 0.9, 0.1]}),
                     ["accuracy_matrix[1]", "3 entries, not 2"]),
    "row too short": (results_text(**{"accuracy_matrix.1": [0.6]}), ["accuracy_matrix[1]", "1 entry, not 2"]),
    "more rows than tasks": (results_text(accuracy_matrix=[[0.8, None], [0.6, 0.9], [0.5, 0.5]]),
                             ["accuracy_matrix", "3 rows", "2 tasks"]),
    "NaN metric": (results_text(**{"metrics.last_accuracy": NAN}), ["metrics.last_accuracy", "NaN", "[0, 1]"]),
    "1.5 metric": (results_text(**{"metrics.avg_incremental_accuracy": 1.5}),
                   ["metrics.avg_incremental_accuracy", "1.5"]),
    "string metric": (results_text(**{"metrics.forgetting": "0.2"}), ["metrics.forgetting", '"0.2"', "[-1, 1]"]),
    "BWT below -1": (results_text(**{"metrics.backward_transfer": -2.0}), ["metrics.backward_transfer", "-2.0"]),
    "accuracy before training": (results_text(accuracy_before_training=[None, 1.5]),
                                 ["accuracy_before_training[1]", "1.5"]),
    "unseen matrix": (results_text(unseen_matrix=[[0.1, INF]]), ["unseen_matrix[0][1]", "Infinity"]),
    "negative size": (results_text(**{"scenario.test_sizes": [10, -1]}), ["scenario.test_sizes[1]", "-1"]),
    "fractional size": (results_text(**{"scenario.test_sizes": [10, 2.5]}), ["scenario.test_sizes[1]", "2.5"]),
    "eval sizes of another length": (results_text(**{"scenario.eval_sizes": [10]}), ["scenario.eval_sizes", "[10]"]),
    "string bytes": (results_text(**{"memory.bytes": "6144"}), ["memory.bytes", '"6144"']),
    "negative seconds": (results_text(**{"timing.train_seconds": -1.0}), ["timing.train_seconds", "-1.0"]),
    "method not an object": (results_text(**{"config.method": "er"}), ["config.method", '"er"']),
    "NaN class weight": (results_text(class_weights=[{"task": 0, "step": 0, "weights": [NAN, 0.5]}]),
                         ["class_weights[0].weights[0]", "NaN"]),
}


@pytest.mark.parametrize("text, words", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_a_value_clipcl_could_not_have_written_is_refused_naming_file_field_and_value(tmp_path, capsys, text, words):
    good = write_run(tmp_path / "good")
    bad = write_raw(tmp_path / "bad", text)
    before = snapshot(tmp_path)
    for args in ([bad], [good, bad], [good, bad, "--out", tmp_path / "report"]):  # alone, beside a good run
        err = fail(["report", *map(str, args)], capsys)
        assert str(bad / "results.json") in err, err
        for w in words:
            assert w in err, (w, err)
        assert "nan" not in err.replace("NaN", "") and "inf" not in err.replace("Infinity", ""), err
        assert snapshot(tmp_path) == before


def test_refused_before_anything_is_printed(tmp_path, capsys):
    bad = write_raw(tmp_path / "bad", results_text(**{"accuracy_matrix.0.0": NAN}))
    assert main(["report", str(write_run(tmp_path / "good")), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1


def test_every_bad_file_is_counted_in_the_one_line(tmp_path, capsys):
    a = write_raw(tmp_path / "a", results_text(**{"accuracy_matrix.0.0": NAN}))
    b = write_raw(tmp_path / "b", results_text(**{"metrics.last_accuracy": 1.5}))
    c = write_raw(tmp_path / "c", "{")
    err = fail(["report", str(a), str(b), str(c), str(write_run(tmp_path / "good"))], capsys)
    assert str(a / "results.json") in err and "2 more of the paths given cannot be used" in err


def test_values_in_range_and_nulls_are_accepted(tmp_path, capsys):
    """The edges are fine: 0 and 1, a negative BWT, null where a task was not evaluated, an unknown metric."""
    text = results_text(accuracy_matrix=[[1.0, None], [0.0, 1.0]], accuracy_before_training=[None, 0.0],
                        unseen_matrix=[[0.1, 0.2], [None, 0.3]],
                        **{"metrics.backward_transfer": -1.0, "metrics.forgetting": 1.0,
                           "metrics.future_accuracy": None, "metrics.something_new": 12.5})
    assert main(["report", str(write_raw(tmp_path / "edge", text))]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "| edge |" in out


# ---------------------------------------------------------------------- one run given several times
def test_a_run_given_as_folder_file_and_link_is_counted_once(tmp_path, capsys):
    run = write_run(tmp_path / "gdro")
    (tmp_path / "link").symlink_to(run)
    (tmp_path / "file-link.json").symlink_to(run / "results.json")
    os.link(run / "results.json", tmp_path / "hard.json")
    given = [run, run / "results.json", tmp_path / "link", tmp_path / "file-link.json", tmp_path / "hard.json"]
    before = snapshot(tmp_path)
    assert main(["report", *map(str, given)]) == 0
    out, err = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == 1 and rows[0].startswith("| gdro |"), out
    notes = err.splitlines()
    assert len(notes) == 1 and notes[0].startswith("clipcl: note: 1 run was given more than once"), err
    assert "counted once" in notes[0] and str(tmp_path / "link" / "results.json") in notes[0]
    assert snapshot(tmp_path) == before
    runs, _ = collect_runs(list(map(str, given)))
    assert list(runs) == ["gdro"]


def test_repeated_runs_of_a_study_are_averaged_once(tmp_path, capsys):
    root = tmp_path / "study"
    for (method, seed) in MATRICES:
        write_run(root / f"{method}_s{seed}", run_results(method, seed))
    (tmp_path / "er_s0-link").symlink_to(root / "er_s0")
    args = [root, root / "er_s0", root / "er_s0" / "results.json", tmp_path / "er_s0-link"]
    assert main(["report", *map(str, args)]) == 0
    out, err = capsys.readouterr()
    tables = md_tables(out)
    comparison = {row[0]: row for row in tables["Comparison: mean ± standard deviation over seeds (%)"][1:]}
    assert comparison["er"][1] == "3" and comparison["gdro"][1] == "4"
    assert "Runs not averaged" not in tables  # no 'repeats seed 0' rows: it is one run, not a repeat
    assert len(tables["Budget per run"]) == 1 + len(MATRICES)
    assert err.startswith("clipcl: note: 1 run was given more than once") and err.count("\n") == 1
    _, _, runs = collect(list(map(str, args)), quiet=True)
    assert len(runs) == len(MATRICES)


# ---------------------------------------------------------------------- names that hold HTML or break tables
HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "a|b", "x`y` &amp; [l](javascript:z)",
           "two\nlines\r\x1b[31m", "$\\foo$ ^$"]


def md_rows(text: str) -> list[list[str]]:
    """Every table line of a Markdown text, split at the pipes that are not escaped."""
    return [re.split(r"(?<!\\)\|", line.strip())[1:-1] for line in text.splitlines() if line.startswith("|")]


def assert_safe_markdown(text: str) -> None:
    low = text.lower()
    assert "<script" not in low and "<img" not in low and "](javascript" not in low, text
    assert "\x1b" not in text and "\r" not in text
    for block in text.split("\n\n"):  # each table keeps its header's column count in every row
        rows = md_rows(block)
        assert all(len(r) == len(rows[0]) for r in rows), block
    for line in text.splitlines():
        assert not line.startswith(("<", "lines", "\\r")), line


def hostile_folder(name: str) -> str:
    return name.replace("/", "_").replace("\n", "_").replace("\r", "_")  # a folder name holds no slash


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_escaped_in_report_md_and_stdout_and_html(tmp_path, capsys, name):
    """The name as config name, method name, folder name, a config key and value, and a seed; grouped over seeds
    (two groups of 2 seeds) so every table of the report holds it."""
    root = tmp_path / "study"
    for method in ("er", name):
        for seed in (0, 1):
            r = run_results("er", seed)
            r["config"].update(name=name, seed=seed if method == "er" else f"{seed}{name}", method={"name": method})
            r["config"][name] = {name: method}
            r["versions"]["device"] = name
            write_run(root / f"{hostile_folder(name)}-{method == 'er'}-{seed}", r)
    report = tmp_path / "report"
    assert main(["report", str(root), "--out", str(report)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    md = (report / "report.md").read_text()
    for text in (out, md):
        assert_safe_markdown(text)
        assert markdown_text(name) in text
    html = (report / "report.html").read_text()
    page = parse_html(html)
    assert "script" not in page.tags and page.tags.count("img") == len(page.images)
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert "<script" not in html.lower() and "<img src=x" not in html.lower()
    shown = name.replace("\r", "\n").strip()  # as the page reads (its line ends normalised)
    assert any(shown in cell for rows in page.tables.values() for row in rows for cell in row)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_folder_names_are_escaped_in_the_per_run_table(tmp_path, capsys, name):
    folders = [write_run(tmp_path / hostile_folder(name)), write_run(tmp_path / "plain")]
    assert main(["report", *map(str, folders)]) == 0
    out, err = capsys.readouterr()
    assert_safe_markdown(out)
    assert len(md_rows(out)) == 4 and all(len(r) == 10 for r in md_rows(out))


def test_hostile_sweep_variant_labels_are_escaped(tmp_path, capsys):
    root = tmp_path / "sweep"
    cells = []
    for variant, method in (("<script>alert(1)</script>", "er"), ("<img src=x onerror=alert(1)> a|b", "gdro")):
        for seed in (0, 1, 2):
            folder = f"{method}__seed-{seed}"
            write_run(root / folder, run_results(method, seed))
            cells.append({"folder": folder, "variant": variant, "values": {"seed": str(seed), "k|<b>": "<i>"}})
    (root / "sweep.json").write_text(json.dumps({"clipcl_sweep": 1, "cells": cells}))
    assert main(["report", str(root), "--out", str(tmp_path / "report")]) == 0
    out, _ = capsys.readouterr()
    md = (tmp_path / "report" / "report.md").read_text()
    for text in (out, md):
        assert_safe_markdown(text)
        assert "&lt;script&gt;alert(1)&lt;/script&gt; · k\\|&lt;b&gt;=&lt;i&gt;" in text
    page = parse_html((tmp_path / "report" / "report.html").read_text())
    labels = [row[0] for row in page.tables["Comparison: mean ± standard deviation over seeds (%)"][1:]]
    assert labels == ["<script>alert(1)</script> · k|<b>=<i>", "<img src=x onerror=alert(1)> a|b · k|<b>=<i>"]


def test_markdown_text_escapes_what_markdown_would_render():
    assert markdown_text("<b>&") == "&lt;b&gt;&amp;"
    assert markdown_text("a|b`c`\\") == "a\\|b\\`c\\`\\\\"
    assert markdown_text("x\ny\x1b\u202e") == "x\\ny\\x1b\\u202e"
    assert markdown_text("![i](http://t/x.png)") == "![i]\\(http://t/x.png)"
    assert markdown_text("method.name=er memory.per_class=2 +1.2 [-0.3, +2.7]") == \
        "method.name=er memory.per_class=2 +1.2 [-0.3, +2.7]"  # plain names and numbers read as they are


# ---------------------------------------------------------------------- --out that cannot be written
def _refuse(monkeypatch, target: Path, code: int) -> None:
    """Path.mkdir of target (or below it) fails with code, as on a read-only or full file system."""
    real = Path.mkdir

    def mkdir(self, *a, **kw):
        if str(self).startswith(str(target)):
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.ENOSPC, "no space"),
                                         (errno.EACCES, "no permission")])
def test_out_that_cannot_be_created_is_one_line_and_exit_4(tmp_path, capsys, monkeypatch, code, words):
    root = write_run(tmp_path / "gdro")
    folder = tmp_path / "ro" / "report"
    before = snapshot(tmp_path)
    _refuse(monkeypatch, tmp_path / "ro", code)
    err = fail(["report", str(root), "--out", str(folder)], capsys, code=4)
    assert f"cannot create the report folder '{folder}'" in err and words in err
    assert snapshot(tmp_path) == before and not (tmp_path / "ro").exists()


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.ENOSPC, "no space")])
def test_out_on_a_file_system_that_refuses_writes_is_one_line_and_exit_4(tmp_path, capsys, monkeypatch, code, words):
    """The folder exists (an earlier report, or empty) on a file system that became read-only or full."""
    root = write_run(tmp_path / "gdro")
    folder = tmp_path / "report"
    folder.mkdir()
    before = snapshot(tmp_path)

    def mkstemp(*a, **kw):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    err = fail(["report", str(root), "--out", str(folder)], capsys, code=4)
    assert f"cannot write the report into '{folder}'" in err and words in err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------- results.json that is no file to read
def _self_loop(run: Path) -> None:
    (run / "results.json").symlink_to(run / "results.json")


def _two_link_loop(run: Path) -> None:
    (run / "results.json").symlink_to(run / "other.json")
    (run / "other.json").symlink_to(run / "results.json")


def _dangling(run: Path) -> None:
    (run / "results.json").symlink_to(run / "gone.json")


def _fifo(run: Path) -> None:
    os.mkfifo(run / "results.json")


def _folder(run: Path) -> None:
    (run / "results.json").mkdir()


@pytest.mark.parametrize("plant, words", [
    (_self_loop, ["is a symbolic link that loops"]),
    (_two_link_loop, ["is a symbolic link that loops"]),
    (_dangling, ["is a symbolic link to", "gone.json", "which does not exist"]),
    (_fifo, ["is not a regular file"]),
    (_folder, ["is a folder"]),
])
@pytest.mark.parametrize("as_file", [False, True])
def test_results_json_that_is_no_file_to_read_says_what_it_is(tmp_path, capsys, plant, words, as_file):
    run = tmp_path / "run"
    run.mkdir()
    plant(run)
    if plant is _folder and as_file:  # a folder named results.json given itself: a folder of runs, without one
        words = ["no results.json in folder"]
    good = write_run(tmp_path / "good")
    before = snapshot(tmp_path)
    given = run / "results.json" if as_file else run
    err = fail(["report", str(good), str(given)], capsys)
    assert str(run / "results.json") in err, err
    for w in words:
        assert w in err, err
    assert "does not exist" not in err or plant is _dangling
    assert snapshot(tmp_path) == before


def test_results_json_without_permission_says_so(tmp_path, capsys, monkeypatch):
    """Running as root reads any file: the refusal is simulated where the file is read."""
    run = write_run(tmp_path / "run")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "results.json" and self.parent == run:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    err = fail(["report", str(run)], capsys)
    assert f"no permission to read '{run / 'results.json'}'" in err
