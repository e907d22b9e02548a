"""clipcl report grouped over seeds: means, sample stds and paired t-intervals checked against numbers computed
here by hand; grouping that never mixes benchmarks or class orders; report.md and a self-contained report.html."""
import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from clipcl import owned
from clipcl.cli import main
from clipcl.summary import Run, choose_baselines, group_runs, t_975
from cli_checks import fail
from test_report import make_results, row_of, snapshot, write_run

# Accuracy matrices of 3 tasks (10 test images each) for two methods and seeds 0, 1, 2 (gdro has seed 3 too).
MATRICES = {
    ("er", 0): [[0.90, None, None], [0.50, 0.88, None], [0.30, 0.45, 0.92]],
    ("er", 1): [[0.86, None, None], [0.55, 0.90, None], [0.36, 0.41, 0.89]],
    ("er", 2): [[0.92, None, None], [0.47, 0.85, None], [0.28, 0.50, 0.94]],
    ("gdro", 0): [[0.88, None, None], [0.62, 0.84, None], [0.44, 0.58, 0.86]],
    ("gdro", 1): [[0.85, None, None], [0.66, 0.82, None], [0.47, 0.52, 0.84]],
    ("gdro", 2): [[0.90, None, None], [0.60, 0.86, None], [0.40, 0.61, 0.88]],
    ("gdro", 3): [[0.80, None, None], [0.70, 0.80, None], [0.60, 0.60, 0.80]],
}
T_2 = 4.303  # t_{0.975} with 2 degrees of freedom, from a printed table


def hand_metrics(R) -> dict[str, float]:
    """The metrics of METHOD.md for equal task sizes, written out independently of clipcl.evaluate."""
    A = np.array([[np.nan if v is None else v for v in row] for row in R])
    T = len(A) - 1
    seen = [np.mean(A[t, : t + 1]) for t in range(T + 1)]
    return {"avg_incremental_accuracy": np.mean(seen), "last_accuracy": seen[-1],
            "forgetting": np.mean([A[j:T, j].max() - A[T, j] for j in range(T)]),
            "backward_transfer": np.mean([A[T, j] - A[j, j] for j in range(T)]),
            "mean_diagonal": np.mean(np.diag(A))}


def run_results(method: str, seed: int, R=None, **kw) -> dict:
    """A results.json of a 3-task run; kw as make_results (order_hash, dataset, per_class, complete, ...)."""
    R = MATRICES[(method, seed)] if R is None else R
    r = make_results(R=R, n_tasks=3, **kw)
    r["config"].update(name="fmnist-cil", seed=seed, method={"name": method})
    r["timing"].update(peak_memory_bytes=300 * 2 ** 20, peak_memory_kind="process max RSS")
    r["versions"] = {"device": "cpu: x86_64", "threads": "2", "clipcl": "0.1.0"}
    return r


def write_study(root: Path, methods=("er", "gdro")) -> Path:
    """root/<method>_s<seed>/results.json for every matrix of MATRICES."""
    for (method, seed) in MATRICES:
        if method in methods:
            write_run(root / f"{method}_s{seed}", run_results(method, seed))
    return root


def md_tables(text: str) -> dict[str, list[list[str]]]:
    """'### title' -> the rows (header first) of the Markdown table under it."""
    tables, title = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:]
            tables[title] = []
        elif line.startswith("|") and title is not None and not line.startswith("|---"):
            tables[title].append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return tables


class ReportParser(HTMLParser):
    """The tables (under their h3 titles), img sources and every src/href of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.links, self.tags = {}, [], [], []
        self.title, self.row, self.text, self.in_cell, self.in_h3 = None, None, "", False, False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "href")]
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "h3":
            self.in_h3, self.text = True, ""
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.in_cell, self.text = True, ""

    def handle_endtag(self, tag):
        if tag == "h3":
            self.in_h3, self.title = False, self.text
            self.tables[self.title] = []
        elif tag in ("td", "th"):
            self.in_cell = False
            self.row.append(self.text.strip())
        elif tag == "tr":
            self.tables[self.title].append(self.row)

    def handle_data(self, data):
        if self.in_cell or self.in_h3:
            self.text += data


def parse_html(text: str) -> ReportParser:
    p = ReportParser()
    p.feed(text)
    return p


def cells(table: list[list[str]], label: str) -> dict[str, str]:
    """The row of a group as column -> cell."""
    header = table[0]
    row = next(r for r in table[1:] if r[0] == label)
    return dict(zip(header, row))


def report_md(capsys, *args) -> str:
    assert main(["report", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_t_quantiles_match_printed_tables():
    assert t_975(2) == T_2 and t_975(1) == 12.706 and t_975(30) == 2.042
    for df, t in {40: 2.021, 60: 2.000, 120: 1.980, 1000: 1.962}.items():  # beyond the table: the expansion
        assert t_975(df) == pytest.approx(t, abs=1.5e-3)


def test_means_and_sample_stds_match_numpy(tmp_path, capsys):
    out = report_md(capsys, write_study(tmp_path / "study"))
    comparison = md_tables(out)["Comparison: mean ± standard deviation over seeds (%)"]
    assert comparison[0] == ["group", "n", "seeds", "avg inc. acc.", "last acc.", "forgetting", "BWT", "mean diag"]
    for method, seeds in {"er": [0, 1, 2], "gdro": [0, 1, 2, 3]}.items():
        row = cells(comparison, method)
        assert row["n"] == str(len(seeds)) and row["seeds"] == ", ".join(map(str, seeds))
        for column, key in [("avg inc. acc.", "avg_incremental_accuracy"), ("last acc.", "last_accuracy"),
                            ("forgetting", "forgetting"), ("BWT", "backward_transfer"), ("mean diag", "mean_diagonal")]:
            x = 100 * np.array([hand_metrics(MATRICES[(method, s)])[key] for s in seeds])
            assert row[column] == f"{x.mean():.1f} ± {x.std(ddof=1):.1f}", (method, column)


def test_paired_intervals_match_a_hand_computed_t_interval(tmp_path, capsys):
    """gdro - er over the seeds both have (0, 1, 2: gdro's seed 3 has no partner): mean ± 4.303 s / sqrt(3)."""
    out = report_md(capsys, write_study(tmp_path / "study"))
    paired = md_tables(out)["Paired differences with the baseline (points): mean [95% t-interval] over the seeds "
                            "both have"]
    assert [r[0] for r in paired[1:]] == ["gdro"]  # er is the baseline (the default), not compared with itself
    row = cells(paired, "gdro")
    assert row["baseline"] == "er" and row["n"] == "3" and row["seeds"] == "0, 1, 2"
    for column, key in [("avg inc. acc.", "avg_incremental_accuracy"), ("last acc.", "last_accuracy"),
                        ("forgetting", "forgetting"), ("BWT", "backward_transfer"), ("mean diag", "mean_diagonal")]:
        d = 100 * np.array([hand_metrics(MATRICES[("gdro", s)])[key] - hand_metrics(MATRICES[("er", s)])[key]
                            for s in (0, 1, 2)])
        half = T_2 * d.std(ddof=1) / np.sqrt(3)
        assert row[column] == f"{d.mean():+.1f} [{d.mean() - half:+.1f}, {d.mean() + half:+.1f}]", column


def test_the_numbers_behind_the_cells(tmp_path):
    """The unrounded statistics, not only their one-decimal text."""
    from clipcl.summary import collect, mean_std, paired_difference

    _, _, runs = collect([str(write_study(tmp_path / "study"))])
    (bench,) = group_runs(runs)
    choose_baselines([bench], None)
    er, gdro = bench.groups
    assert (er.label, gdro.label, gdro.baseline) == ("er", "gdro", er)
    last = {g.label: g.values("last_accuracy") for g in bench.groups}
    x = np.array([hand_metrics(MATRICES[("gdro", s)])["last_accuracy"] for s in range(4)])
    s = mean_std(list(last["gdro"].values()))
    assert (s.mean, s.std, s.n) == (pytest.approx(100 * x.mean()), pytest.approx(100 * x.std(ddof=1)), 4)
    d = 100 * (x[:3] - np.array([hand_metrics(MATRICES[("er", s)])["last_accuracy"] for s in range(3)]))
    diff = paired_difference([last["gdro"][s] for s in range(3)], [last["er"][s] for s in range(3)])
    half = T_2 * d.std(ddof=1) / np.sqrt(3)
    assert (diff.mean, diff.low, diff.high, diff.n) == (pytest.approx(d.mean()), pytest.approx(d.mean() - half),
                                                        pytest.approx(d.mean() + half), 3)


def test_one_run_per_config_keeps_the_per_run_table(tmp_path, capsys):
    write_run(tmp_path / "er", run_results("er", 0))
    write_run(tmp_path / "gdro", run_results("gdro", 0))
    out = report_md(capsys, tmp_path / "er", tmp_path / "gdro")
    assert out.startswith("| method | avg inc. acc. |") and row_of(out, "gdro")


@pytest.mark.parametrize("change, differs", [
    ({"order_hash": "ffff000011112222"}, "class order"),
    ({"dataset": "cifar100"}, None),  # another config: apart, with nothing to explain
])
def test_runs_of_other_benchmarks_or_class_orders_are_never_averaged(tmp_path, capsys, change, differs):
    """Seeds 0-2 of er on one class order, seeds 3-5 on another (same config, e.g. a class order that changed
    with the seed): two benchmarks with 3 runs each, not one of 6."""
    for seed in range(6):
        R = MATRICES[("er", seed % 3)]
        write_run(tmp_path / f"er_s{seed}", run_results("er", seed, R=R, **(change if seed >= 3 else {})))
    out = report_md(capsys, tmp_path)
    sections = [line for line in out.splitlines() if line.startswith("## Benchmark")]
    assert len(sections) == 2
    first, second = out.split("## Benchmark 2")
    assert cells(md_tables(first)["Comparison: mean ± standard deviation over seeds (%)"], "er")["seeds"] == "0, 1, 2"
    assert cells(md_tables(second)["Comparison: mean ± standard deviation over seeds (%)"], "er")["seeds"] == "3, 4, 5"
    note = f"the runs of er have the same config as runs in benchmarks 1, 2 but a different {differs}"
    for part in (first, second):  # a split of one config is said, with what differs
        assert (note in part) == (differs is not None) and (differs is not None or "same config" not in part)


def test_labels_name_the_keys_that_differ(tmp_path):
    runs = []
    for method, per_class in [("er", 2), ("er", 10), ("gdro", 2), ("gdro", 10)]:
        for seed in range(2):
            r = run_results(method, seed, R=MATRICES[(method, seed)], per_class=per_class)
            runs.append(Run(f"{method}{per_class}_{seed}", Path(f"{method}{per_class}_{seed}"), r))
    (bench,) = group_runs(runs)
    assert [g.label for g in bench.groups] == ["method.name=er memory.per_class=2",
                                              "method.name=er memory.per_class=10",
                                              "method.name=gdro memory.per_class=2",
                                              "method.name=gdro memory.per_class=10"]
    assert [len(g.averaged) for g in bench.groups] == [2, 2, 2, 2]
    choose_baselines([bench], None)  # several er groups: each gdro group gets the er group of its memory size
    assert [g.baseline.label if g.baseline else None for g in bench.groups] == [
        None, None, "method.name=er memory.per_class=2", "method.name=er memory.per_class=10"]


def test_a_difference_the_labels_do_not_show_is_tabled(tmp_path, capsys):
    """er always with 2 images per class, gdro with 10: the method tells the groups apart, the table shows both."""
    for method, per_class in [("er", 2), ("gdro", 10)]:
        for seed in range(3):
            write_run(tmp_path / f"{method}_s{seed}", run_results(method, seed, per_class=per_class))
    groups = md_tables(report_md(capsys, tmp_path))["Groups: every setting in which they differ"]
    assert groups == [["group", "method.name", "memory.per_class"], ["er", "er", "2"], ["gdro", "gdro", "10"]]


def test_ignored_keys_do_not_split_a_group_and_the_device_does(tmp_path):
    runs = []
    for seed, extra in enumerate([{}, {"checkpoint_every": 50}, {"name": "renamed"}, {"device": "cuda"}]):
        r = run_results("er", seed % 3)
        r["config"].update({"seed": seed, "device": "auto", **extra})
        runs.append(Run(f"er_{seed}", Path(f"er_{seed}"), r))
    (bench,) = group_runs(runs)  # a CUDA run computes in bf16 (model.precision auto): not averaged with the others
    assert [(g.label, g.seeds) for g in bench.groups] == [("device=auto", [0, 1, 2]), ("device=cuda", [3])]


def test_incomplete_runs_and_repeated_seeds_are_listed_not_averaged(tmp_path, capsys):
    root = write_study(tmp_path / "study")
    write_run(root / "er_s3", run_results("er", 3, R=[[0.1, None, None]], complete=False))
    write_run(root / "zz_er_s0_again", run_results("er", 0, R=MATRICES[("er", 1)]))
    out = report_md(capsys, root)
    tables = md_tables(out)
    assert cells(tables["Comparison: mean ± standard deviation over seeds (%)"], "er")["seeds"] == "0, 1, 2"
    left = tables["Runs not averaged"]
    assert left[1:] == [["zz_er_s0_again", "er", "0", "repeats seed 0 of er_s0"],  # in seed order
                        ["er_s3", "er", "3", "incomplete: 1/3 tasks"]]
    assert "Incomplete runs are listed but not averaged" in out


def test_folders_of_runs_at_any_depth_are_collected_in_order(tmp_path, capsys):
    for method, seed in MATRICES:
        write_run(tmp_path / "sweep" / f"method.name={method}" / f"seed={seed}", run_results(method, seed))
    (tmp_path / "sweep" / "notes.txt").write_text("not a run")
    out = report_md(capsys, tmp_path / "sweep", tmp_path / "sweep" / "method.name=er")  # the er runs twice
    budget = md_tables(out)["Budget per run"]
    # labels are the shortest distinguishing paths: gdro's seed=3 is the only one of its name
    assert [r[0] for r in budget[1:]] == [f"method.name={m}/seed={s}" for m, s in MATRICES][:-1] + ["seed=3"]
    assert cells(md_tables(out)["Comparison: mean ± standard deviation over seeds (%)"], "er")["n"] == "3"


def test_budget_card(tmp_path, capsys):
    root = write_study(tmp_path / "study", methods=("er",))
    r = json.loads((root / "er_s1" / "results.json").read_text())
    r["model"] = {"trainable_parameters": 1234567}
    write_run(root / "er_s1", r)
    budget = md_tables(report_md(capsys, root))["Budget per run"]
    assert budget[0] == ["run", "group", "seed", "memory images", "memory KiB", "trained parameters", "train s",
                         "train img/s", "peak memory", "device", "threads"]
    assert budget[1] == ["er_s0", "er", "0", "8", "6", "-", "1.2", "900", "300 MiB (process max RSS)",
                         "cpu: x86_64", "2"]
    assert budget[2][5] == "1,234,567"


def test_baseline_option(tmp_path, capsys):
    root = write_study(tmp_path / "study")
    out = report_md(capsys, root, "--baseline", "method.name=gdro")
    paired = next(t for title, t in md_tables(out).items() if title.startswith("Paired"))
    row = cells(paired, "er")
    assert row["baseline"] == "gdro" and row["seeds"] == "0, 1, 2"
    assert row["last acc."].startswith("-")  # er - gdro: the opposite sign of gdro - er
    assert "gdro" in report_md(capsys, root, "--baseline", "gdro")  # a label is a spec too
    err = fail(["report", str(root), "--baseline", "method.name=joint"], capsys)
    assert "--baseline 'method.name=joint' matches no group" in err and "er, gdro" in err


def test_without_an_er_group_there_is_no_default_baseline(tmp_path, capsys):
    root = tmp_path / "study"
    for (method, seed), R in MATRICES.items():
        if method == "gdro":
            write_run(root / f"{method}_s{seed}", run_results(method, seed))
            write_run(root / f"gcl_s{seed}", run_results("gcl", seed, R=R))
    out = report_md(capsys, root)
    assert not any(title.startswith("Paired") for title in md_tables(out))
    assert "no paired differences: no group matches the baseline 'method.name=er' in this benchmark" in out


def test_report_folder_md_and_self_contained_html(tmp_path, capsys):
    root = write_study(tmp_path / "study")
    r = json.loads((root / "gdro_s0" / "results.json").read_text())
    r["class_weights"] = make_results(weights=True)["class_weights"]
    write_run(root / "gdro_s0", r)
    folder = tmp_path / "report"
    stdout = report_md(capsys, root, "--out", folder)
    md = (folder / "report.md").read_text()
    page = parse_html((folder / "report.html").read_text())
    assert md_tables(md) == md_tables(stdout)  # the same tables on stdout, in report.md and in report.html
    assert {title: rows for title, rows in page.tables.items()} == md_tables(md)
    assert list(page.tables) == ["Comparison: mean ± standard deviation over seeds (%)",
                                 "Paired differences with the baseline (points): mean [95% t-interval] over the "
                                 "seeds both have", "Budget per run"]
    assert "script" not in page.tags and "link" not in page.tags
    assert not [u for u in page.links if u.startswith(("http:", "https:", "//"))]
    assert len(page.images) == 5  # seen accuracy, forgetting, a heatmap per group, gdro's class weights
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and png.rstrip().endswith(b"IEND\xaeB`\x82")
    files = sorted(p.name for p in folder.iterdir())
    assert [f for f in files if f.endswith(".png")] == sorted(f for f in files if f.startswith("fig-"))
    linked = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert sorted(linked) == [f for f in files if f.endswith(".png")]
    # run again over the same folder: allowed (only report files in it); a plot it no longer draws is removed
    (folder / "fig-b9-old.png").write_bytes(b"an earlier report's plot")
    owned.add_files(folder, ["fig-b9-old.png"])  # as a report writes it: listed in the folder's marker
    report_md(capsys, root, "--out", folder)
    assert not (folder / "fig-b9-old.png").exists() and (folder / "report.html").is_file()


@pytest.mark.parametrize("foreign", ["notes.txt", "results.json", "sub/", "fig-b1-mine.png"])
def test_out_folder_with_foreign_files_is_refused(tmp_path, capsys, foreign):
    """Anything but an earlier report's files, and names like a report's in a folder no report wrote (no
    marker): a user's own figure is never replaced."""
    root = write_study(tmp_path / "study", methods=("er",))
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "report.md").write_text("an earlier report")
    if foreign.endswith("/"):
        (folder / foreign).mkdir()
    else:
        (folder / foreign).write_text("mine")
    before = snapshot(tmp_path)
    err = fail(["report", str(root), "--out", str(folder)], capsys)
    assert str(folder) in err and foreign.rstrip("/") in err and "earlier report" in err
    assert snapshot(tmp_path) == before


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "report.html"
    target.write_text("x")
    err = fail(["report", str(write_study(tmp_path / "study", methods=("er",))), "--out", str(target)], capsys)
    assert "is a file" in err and target.read_text() == "x"


def test_plot_of_groups(tmp_path, capsys):
    plot = tmp_path / "cmp.png"
    report_md(capsys, write_study(tmp_path / "study"), "--plot", plot)
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_report_html_renders_in_headless_chromium(tmp_path, capsys):
    chromium = shutil.which("chromium") or (Path("/usr/bin/chromium") if Path("/usr/bin/chromium").exists() else None)
    if not chromium:
        pytest.skip("chromium is not installed (apt-get install -y -qq chromium)")
    import matplotlib.image

    root = write_study(tmp_path / "study")
    report_md(capsys, root, "--out", tmp_path / "report")
    shot = tmp_path / "shot.png"
    subprocess.run([str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    (tmp_path / "report" / "report.html").as_uri()], check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1200)
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, tables and the plots, not a blank page
    assert (pixels[..., :3] < 0.5).any(axis=-1).mean() > 0.01  # dark text and lines on a light page


def test_runs_of_a_sweep_are_labelled_and_ordered_as_its_cells(tmp_path, capsys):
    """A sweep's folder: groups take the cells' names ('variant · key=value', seed left out) in the sweep's
    order, not config keys in alphabetical order; the numbers are the same as without the sweep's record."""
    root = tmp_path / "sweep"
    cells = []
    for variant, method in (("z plain er", "er"), ("a robust", "gdro")):  # sweep order is not alphabetical
        for (m, seed) in MATRICES:
            if m == method:
                folder = f"{variant.replace(' ', '_')}__seed-{seed}"
                write_run(root / folder, run_results(method, seed))
                cells.append({"folder": folder, "variant": variant, "values": {"seed": str(seed)}})
    plain = md_tables(report_md(capsys, root))["Comparison: mean ± standard deviation over seeds (%)"]
    (root / "sweep.json").write_text(json.dumps({"clipcl_sweep": 1, "cells": cells}))
    named = md_tables(report_md(capsys, root))["Comparison: mean ± standard deviation over seeds (%)"]
    assert [row[0] for row in named[1:]] == ["z plain er", "a robust"]
    by_method = {row[0]: row[1:] for row in plain[1:]}
    assert named[1][1:] == by_method["er"] and named[2][1:] == by_method["gdro"]


def test_many_sweep_cells_are_drawn_one_panel_per_grid_value():
    """Twelve cells 'variant · memory': one panel per memory size, a line per variant; a few groups, or labels
    that are not a sweep's, stay on one panel."""
    from clipcl.html_report import facets
    from clipcl.summary import Benchmark, Group

    def bench(labels):
        return Benchmark(1, "b", "d", [Group(label, {}, [], averaged=[object()]) for label in labels], [])

    cells = [f"{v} · memory.per_class={m}" for v in ("er", "gdro", "gcl") for m in (1, 2, 5, 10)]
    panels = facets(bench(cells))
    assert list(panels) == ["memory.per_class=1", "memory.per_class=2", "memory.per_class=5", "memory.per_class=10"]
    assert [v for v, _ in panels["memory.per_class=2"]] == ["er", "gdro", "gcl"]
    assert facets(bench(cells[:8])) is None
    assert facets(bench([f"method.name=m{i}" for i in range(12)])) is None


def test_a_report_of_many_sweep_cells_draws_the_panels_and_lists_the_settings(tmp_path, capsys):
    """Ten cells (5 variants x 2 memory sizes, 3 seeds): the report draws its seen-accuracy figure (one panel per
    memory size) and, since the sweep's names show no setting, the table of the settings they differ in."""
    root = tmp_path / "sweep"
    cells = []
    for v in range(5):
        for m in (1, 2):
            for (method, seed) in MATRICES:
                if method == "er":
                    r = run_results("er", seed)
                    r["config"]["method"]["name"] = f"method{v}"
                    r["config"]["memory"]["per_class"] = m
                    folder = f"v{v}__memory.per_class-{m}__seed-{seed}"
                    write_run(root / folder, r)
                    cells.append({"folder": folder, "variant": f"variant {v}",
                                  "values": {"memory.per_class": str(m), "seed": str(seed)}})
    (root / "sweep.json").write_text(json.dumps({"clipcl_sweep": 1, "cells": cells}))
    md = report_md(capsys, root, "--out", tmp_path / "report")
    tables = md_tables(md)
    assert [row[0] for row in tables["Comparison: mean ± standard deviation over seeds (%)"][1:3]] == [
        "variant 0 · memory.per_class=1", "variant 0 · memory.per_class=2"]
    settings = tables["Groups: every setting in which they differ"]
    assert settings[0][1:] == ["method.name", "memory.per_class"] and settings[1][1:] == ["method0", "1"]
    png = (tmp_path / "report" / "fig-b1-seen-accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG")
