"""clipcl sweep: a grid expands to the expected cells, every cell is checked before any runs, a failed or foreign
cell is reported without stopping the others, a rerun skips finished cells and resumes a killed one, and Ctrl-C
(or SIGTERM) stops the running cells so that a rerun resumes them.

The cells' processes are real clipcl runs only in one test (the shipped 'tiny' grid); the others replace the
command a cell runs with a few lines of Python (the `command` argument of sweep.run).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipcl import owned, sweep
from clipcl.cli import main
from clipcl.config import ConfigError
from cli_checks import DIE_AFTER_SAVE, fail

TINY_CELLS = ["zeroshot__memory.per_class-1", "er__memory.per_class-1", "er__memory.per_class-2"]
# A cell that succeeds without clipcl: it leaves ran.txt (its OMP_NUM_THREADS, its action and overrides).
FAKE_RUN = ("import os, pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True); "
            "(p / 'ran.txt').write_text(' '.join([os.environ['OMP_NUM_THREADS'], *sys.argv[2:]]))")
FAKE_FAIL = "import sys; print('early line'); print('boom: the cell broke', file=sys.stderr); sys.exit(3)"


def fake_command(failing: tuple[str, ...] = ()):
    def command(config, overrides, out, action):
        if out.name in failing:
            return [sys.executable, "-c", FAKE_FAIL]
        return [sys.executable, "-c", FAKE_RUN, str(out), action, *overrides]
    return command


def record(out: Path) -> dict[str, dict]:
    return {c["folder"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}


def write_grid(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- expansion
def test_grid_expands_to_variants_times_product_with_pinned_duplicates_run_once(tmp_path):
    path = write_grid(tmp_path, """
overrides: [scenario.train_per_class=50]
variants:
  finetune: [method.name=finetune, memory.per_class=1]
  balanced (dro=none): [method.name=gdro, method.dro=none]
grid:
  memory.per_class: [1, 2]
  method.gcl_form: [pairs, prompts]
""")
    grid = sweep.load_grid(str(path))
    cells = sweep.expand(grid, ["optim.epochs=2"])
    assert [c.name for c in cells] == [  # finetune does not read gcl_form: one cell, at its default
        "finetune__memory.per_class-1__method.gcl_form-prompts",
        "balanced_dro_none__memory.per_class-1__method.gcl_form-pairs",
        "balanced_dro_none__memory.per_class-1__method.gcl_form-prompts",
        "balanced_dro_none__memory.per_class-2__method.gcl_form-pairs",
        "balanced_dro_none__memory.per_class-2__method.gcl_form-prompts"]
    # shared, command line, variant, then the grid values the variant does not pin
    assert cells[0].overrides == ("scenario.train_per_class=50", "optim.epochs=2", "method.name=finetune",
                                  "memory.per_class=1")
    assert sweep.count_cells(grid) == len(cells) == 5
    assert cells[4].overrides[-2:] == ("memory.per_class=2", "method.gcl_form=prompts")
    cfgs = sweep.configs("fmnist-cil", grid, cells, ["optim.epochs=2"])
    c = cfgs["balanced_dro_none__memory.per_class-2__method.gcl_form-prompts"]
    assert (c.method.name, c.method.dro, c.memory.per_class, c.method.gcl_form, c.scenario.train_per_class,
            c.optim.epochs) == ("gdro", "none", 2, "prompts", 50, 2.0)
    assert cfgs["finetune__memory.per_class-1__method.gcl_form-prompts"].memory.per_class == 1


def test_grid_values_that_yaml_would_misread_are_quoted_and_odd_labels_made_safe(tmp_path):
    path = write_grid(tmp_path, """
variants:
  "../up / (x=1)": [method.name=er]
grid:
  name: ["true", "a b"]
  scenario.classes: [[0, 1, 2, 3]]
""")
    grid = sweep.load_grid(str(path))
    cells = sweep.expand(grid)
    assert [c.name for c in cells] == ["up_x_1__name-true__scenario.classes-0_1_2_3",
                                       "up_x_1__name-a_b__scenario.classes-0_1_2_3"]
    cfgs = sweep.configs("fmnist-cil", grid, cells)
    assert [cfgs[c.name].name for c in cells] == ["true", "a b"]  # a string, not the boolean
    assert cfgs[cells[0].name].scenario.classes == (0, 1, 2, 3)


@pytest.mark.parametrize("name, n, per_variant", [
    ("method-study", 125, {"finetune": 5, "er": 20, "balanced (gdro dro=none)": 20, "balanced pairs form": 20,
                           "er (herding)": 20, "gcl": 20, "gdro": 20}),
    ("memory-study", 51, {"finetune": 3, "er": 12, "gcl": 12, "gdro": 12, "gdro (dro=none)": 12}),
    ("tiny", 3, {"zeroshot": 1, "er": 2}),
])
def test_shipped_grids_expand_and_validate(name, n, per_variant):
    grid = sweep.load_grid(name)
    cells = sweep.expand(grid)
    cfgs = sweep.configs("fmnist-cil", grid, cells, ["scenario.train_per_class=500"])
    assert len(cells) == n == len({c.name for c in cells})
    assert {v: sum(c.variant == v for c in cells) for v in per_variant} == per_variant
    assert all(cfgs[c.name].memory.per_class == 1 for c in cells if c.variant in ("finetune", "zeroshot"))
    assert name in sweep.list_grids()


# ---------------------------------------------------------------------------------------------- mistakes
@pytest.mark.parametrize("text, extra, words", [
    ("grid:\n  memory.per_clas: [1, 2]\n", [], ["grid.yaml", "cell 'memory.per_clas-1'", "memory.per_clas",
                                                "memory.per_class"]),
    ("variants:\n  a b: [method.name=er]\n  bad one: [method.dro=chi2]\ngrid:\n  seed: [0, 1]\n", [],
     ["grid.yaml", "cell 'bad_one__seed-0'", "method.dro", "chi2"]),
    ("grid:\n  memory.per_class: [1, -2]\n", [], ["grid.yaml", "cell 'memory.per_class--2'", "-2"]),
    ("overrides: [optim.lr=fast]\ngrid:\n  seed: [0]\n", [], ["grid.yaml", "overrides", "optim.lr", "fast"]),
    ("grids:\n  seed: [0]\n", [], ["grid.yaml", "unknown section", "grids"]),
    ("grid:\n  seed: 0\n", [], ["grid.yaml", "seed", "list"]),
    ("variants:\n  er: method.name=er\n", [], ["grid.yaml", "variant 'er'", "key=value"]),
    ("overrides: [seed=1]\ngrid:\n  seed: [0, 1]\n", [], ["grid.yaml", "seed", "both in overrides and in grid"]),
    ("grid:\n  seed: [0, 1]\n", ["seed=3"], ["seed=3", "grid.yaml", "varies"]),
    ("variants:\n  a b: []\n  a_b: []\n", [], ["grid.yaml", "'a b'", "'a_b'", "folder name"]),
    ("grid: [\n", [], ["grid.yaml", "not valid YAML"]),
])
def test_a_mistake_in_a_grid_is_one_clear_line_and_nothing_runs(text, extra, words, tmp_path):
    path = write_grid(tmp_path, text)
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError) as e:
        sweep.run("fmnist-cil", str(path), extra, out, command=fake_command())
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)
    assert not out.exists()


def test_a_mistake_in_a_grid_is_one_error_line_of_the_command_line(tmp_path, capsys):
    path = write_grid(tmp_path, "variants:\n  er: [method.name=er]\ngrid:\n  memory.per_clas: [1]\n")
    line = fail(["sweep", "fmnist-cil", str(path), "--out", str(tmp_path / "s")], capsys)
    assert f"grid file '{path}', cell 'er__memory.per_clas-1': unknown config key 'memory.per_clas'" in line
    assert not (tmp_path / "s").exists()


def test_unknown_grid_name_lists_the_shipped_ones(tmp_path, capsys):
    line = fail(["sweep", "fmnist-cil", "no-such-grid", "--out", str(tmp_path / "s")], capsys)
    assert "no-such-grid" in line and "method-study" in line and "tiny" in line


# ---------------------------------------------------------------------------------------------- failures
def test_a_failed_cell_is_reported_with_exit_code_and_last_lines_and_the_others_run(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = sweep.run("fmnist-cil", "tiny", [], out, jobs=2, threads=3,
                     command=fake_command(failing=("er__memory.per_class-1",)))
    err = capsys.readouterr().err
    assert code == 1
    cells = record(out)
    assert {n: c["status"] for n, c in cells.items()} == {
        "zeroshot__memory.per_class-1": "finished", "er__memory.per_class-1": "failed",
        "er__memory.per_class-2": "finished"}
    bad = cells["er__memory.per_class-1"]
    assert bad["exit_code"] == 3 and "boom: the cell broke" in bad["note"] and "early line" in bad["note"]
    assert "boom: the cell broke" in (out / bad["log"]).read_text()
    assert "er__memory.per_class-1 FAILED (exit 3)" in err and "    boom: the cell broke" in err
    assert "failed: er__memory.per_class-1 (exit 3" in err
    assert [line[:5] for line in err.splitlines() if "— ETA" in line] == ["[1/3]", "[2/3]", "[3/3]"]
    # the others ran with their overrides and the thread count asked for
    ran = (out / "er__memory.per_class-2" / "ran.txt").read_text().split()
    assert ran[:2] == ["3", "run"] and ran[-2:] == ["method.name=er", "memory.per_class=2"]
    assert cells["er__memory.per_class-2"]["command"].split()[-2:] == ["method.name=er", "memory.per_class=2"]


def test_a_folder_holding_files_clipcl_did_not_write_is_left_alone(tmp_path, capsys):
    out = tmp_path / "sweep"
    mine = out / "er__memory.per_class-2"
    mine.mkdir(parents=True)
    owned.create_marker(out, "sweep")  # a sweep of clipcl's, with a cell folder holding the user's files
    (mine / "notes.txt").write_text("my notes")
    code = sweep.run("fmnist-cil", "tiny", [], out, jobs=1, threads=1, command=fake_command())
    err = capsys.readouterr().err
    assert code == 1
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"
    cells = record(out)
    assert cells["er__memory.per_class-2"]["status"] == "refused" and cells["er__memory.per_class-2"]["command"] is None
    assert "notes.txt" in cells["er__memory.per_class-2"]["note"]
    assert "failed: er__memory.per_class-2" in err and "did not write" in err
    assert (out / "er__memory.per_class-1" / "ran.txt").is_file()


def test_a_sweep_json_that_clipcl_did_not_write_is_not_replaced(tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text('{"mine": 1}')
    line = fail(["sweep", "fmnist-cil", "tiny", "--out", str(out)], capsys)
    assert "sweep.json" in line and (out / "sweep.json").read_text() == '{"mine": 1}'


# ---------------------------------------------------------------------------------------------- real runs
def test_real_sweep_then_rerun_skips_finished_cells_and_resumes_a_killed_one(tmp_path, capsys):
    out = tmp_path / "sweep"
    victim = "er__memory.per_class-2"

    def killed_after_its_first_checkpoint(config, overrides, folder, action):
        cmd = sweep.cell_command(config, overrides, folder, action)
        if folder.name != victim:
            return cmd
        return ["env", "DIE_AFTER_SAVE=1", sys.executable, "-c", DIE_AFTER_SAVE, *cmd[3:]]  # cmd[3] is "run"

    code = sweep.run("fmnist-cil", "tiny", [], out, jobs=2, threads=1, command=killed_after_its_first_checkpoint)
    capsys.readouterr()
    assert code == 1
    cells = record(out)
    assert cells[victim]["status"] == "failed" and cells[victim]["exit_code"] == -signal.SIGKILL
    assert (out / victim / "checkpoint.pt").is_file()
    finished = {}
    for name in TINY_CELLS[:2]:
        r = json.loads((out / name / "results.json").read_text())
        assert r["complete"] is True and r["versions"]["threads"] == "1"
        finished[name] = (out / name / "results.json").stat().st_mtime_ns
    r = json.loads((out / "er__memory.per_class-1" / "results.json").read_text())
    assert (r["config"]["method"]["name"], r["config"]["memory"]["per_class"]) == ("er", 1)

    assert main(["sweep", "fmnist-cil", "tiny", "--out", str(out), "--jobs", "2", "--threads-per-job", "1"]) == 0
    err = capsys.readouterr().err
    assert "2 finished earlier (skipped), 1 to resume, 0 to start" in err
    cells = record(out)
    assert [cells[n]["status"] for n in TINY_CELLS] == ["skipped", "skipped", "resumed"]
    assert cells[victim]["command"].endswith("--quiet --resume")
    assert {n: (out / n / "results.json").stat().st_mtime_ns for n in finished} == finished  # not run again
    r = json.loads((out / victim / "results.json").read_text())
    assert r["complete"] is True and len(r["accuracy_matrix"]) == 2
    assert (r["config"]["method"]["name"], r["config"]["memory"]["per_class"]) == ("er", 2)

    # the same folders with another config: finished runs are neither reused nor replaced
    assert main(["sweep", "fmnist-cil", "tiny", "optim.lr=0.01", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("another config") >= 3 and "optim.lr" in err
    assert {n: (out / n / "results.json").stat().st_mtime_ns for n in finished} == finished


# ---------------------------------------------------------------------------------------------- stopping
SLEEPER = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
def stop(signum, frame):
    (out / "stopped.txt").write_text(str(signum)); sys.exit(128 + signum)
signal.signal(signal.SIGINT, stop); signal.signal(signal.SIGTERM, stop)
(out / "started.txt").write_text("")
time.sleep(120)
"""
SWEEP_OF_SLEEPERS = f"""
import sys
from pathlib import Path
from clipcl import sweep
def command(config, overrides, out, action):
    return [sys.executable, "-c", {SLEEPER!r}, str(out)]
code = sweep.run("fmnist-cil", "tiny", [], Path(sys.argv[1]), jobs=2, threads=1, command=command)
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_running_cells_and_the_rest_waits_for_a_rerun(signum, tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-c", SWEEP_OF_SLEEPERS, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("*/started.txt"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signum)  # to the sweep only: it passes the signal on to its cells
        stdout, stderr = proc.communicate(timeout=30)
    finally:  # a sweep that did not stop must not leave its cells behind: its own process group goes
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + signum, stderr
    started = sorted(p.parent.name for p in out.glob("*/started.txt"))
    assert started == sorted(TINY_CELLS[:2])
    assert [(out / n / "stopped.txt").read_text() for n in started] == [str(int(signum))] * 2
    assert not (out / TINY_CELLS[2]).exists()
    assert [record(out)[n]["status"] for n in TINY_CELLS] == ["interrupted", "interrupted", "not started"]
    assert "run the same command again" in stderr and "torch imported: False" in stdout
