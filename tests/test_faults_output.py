"""Output that never replaces a user's file, never escapes through a planted link, and is never written by two
processes at once: the second round of the fault suite (issue: nothing lost, nothing escapes).

Each case asserts the exit code, the one 'clipcl: error:' line, no traceback, and every file that existed before
still there, byte for byte (tests/cli_checks.py).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from clipcl import owned, rundir, sweep
from clipcl.cli import main
from cli_checks import DIE_AFTER_SAVE, fail, snapshot

TINY = ["scenario.train_per_class=20", "scenario.test_per_class=10", "scenario.n_tasks=1", "optim.epochs=1",
        "optim.batch_size=16", "method.name=er", "memory.per_class=2", "eval.batch_size=64"]
ZEROSHOT = [*TINY, "method.name=zeroshot"]
TWO_TASKS = ["scenario.train_per_class=20", "scenario.test_per_class=10", "scenario.n_tasks=2", "optim.epochs=1",
             "optim.batch_size=8", "method.name=er", "memory.per_class=2", "eval.batch_size=64",
             "checkpoint_every=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}

# `python -c HOLD clipcl-args...`: clipcl that stops (sleeps) inside its first checkpoint save, so that the folder
# is claimed and locked while the test tries a second process on it; it prints READY first.
HOLD = """
import os, sys, time
from clipcl import checkpoint
def hold(path, state):
    print("READY", flush=True)
    time.sleep(120)
checkpoint.save = hold
from clipcl.cli import main
sys.exit(main(sys.argv[1:]))
"""
# killed (SIGKILL) at its first checkpoint, before anything of it is written: only log.csv and the marker are left
DIE_BEFORE_FIRST_SAVE = """
import os, signal, sys
from clipcl import checkpoint
checkpoint.save = lambda path, state: os.kill(os.getpid(), signal.SIGKILL)
from clipcl.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "fmnist-cil", *TINY, "--out", str(out), "--quiet"]) == 0
    return out


def copy_run(finished: Path, tmp_path: Path, name: str = "run") -> Path:
    out = tmp_path / name
    shutil.copytree(finished, out, symlinks=True)
    return out


def holding(argv: list[str]) -> subprocess.Popen:
    """A clipcl process paused inside its first checkpoint (the folder claimed and locked)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "READY"
    return proc


# ---------------------------------------------------------------------- the marker and the manifest
def test_a_run_lists_every_file_it_wrote_in_its_marker(finished):
    marker = owned.read_marker(finished)
    assert marker["kind"] == "run" and marker["written_by"] == "clipcl"
    on_disk = {p.name for p in finished.iterdir() if p.name not in owned.META_NAMES}
    assert on_disk == set(marker["files"])  # every file, and nothing it did not write
    assert not (finished / owned.LOCK_NAME).exists()  # released when the run ended


def test_overwrite_of_a_copied_results_json_beside_the_users_files_is_refused(finished, tmp_path, capsys):
    """The case of the issue: results.json copied by hand next to the user's own log.csv and accuracy.png."""
    out = tmp_path / "mine"
    out.mkdir()
    shutil.copy(finished / "results.json", out / "results.json")
    (out / "log.csv").write_text("my,own\n1,2\n")
    (out / "accuracy.png").write_bytes(b"\x89PNG my plot")
    before = snapshot(out)
    err = fail(["run", "fmnist-cil", *ZEROSHOT, "--out", str(out), "--overwrite"], capsys)
    assert "holds no clipcl run" in err and owned.MARKER_NAME in err
    assert snapshot(out) == before


def test_overwrite_removes_exactly_the_listed_files_and_names_every_kept_one(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    (out / "notes.md").write_text("mine")
    (out / "extra").mkdir()
    (out / "extra" / "a.txt").write_text("mine too")
    assert main(["run", "fmnist-cil", *ZEROSHOT, "--out", str(out), "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "kept 2 entries" in err and "notes.md" in err and "extra" in err
    assert (out / "notes.md").read_text() == "mine" and (out / "extra" / "a.txt").read_text() == "mine too"
    assert json.loads((out / "results.json").read_text())["config"]["method"]["name"] == "zeroshot"
    assert not (out / "class_weights.png").exists() and "log.csv" in owned.read_marker(out)["files"]


def test_overwrite_refuses_a_users_file_with_a_name_the_run_writes(finished, tmp_path, capsys):
    """A file of the user's that is not in the marker but has a run file's name would be replaced: refused."""
    out = copy_run(finished, tmp_path)
    marker = owned.read_marker(out)
    owned.create_marker(out, "run", [f for f in marker["files"] if f != "accuracy.png"])
    (out / "accuracy.png").write_bytes(b"my own figure")
    before = snapshot(out)
    err = fail(["run", "fmnist-cil", *ZEROSHOT, "--out", str(out), "--overwrite"], capsys)
    assert "'accuracy.png'" in err and "did not write" in err
    assert snapshot(out) == before


def test_a_marker_of_another_kind_is_not_a_run(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    owned.create_marker(out, "report", ["results.json"])
    before = snapshot(out)
    err = fail(["run", "fmnist-cil", *ZEROSHOT, "--out", str(out), "--overwrite"], capsys)
    assert "holds no clipcl run" in err and snapshot(out) == before


def test_resume_of_a_checkpoint_without_the_marker_is_refused(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    (out / owned.MARKER_NAME).unlink()
    before = snapshot(out)
    err = fail(["resume", str(out)], capsys)
    assert "no clipcl marker" in err and snapshot(out) == before


# ---------------------------------------------------------------------- the demo's folder
def test_demo_overwrite_never_replaces_a_users_summary_md(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "summary.md").write_text("# my own summary\n")
    (out / "comparison.png").write_bytes(b"my png")
    before = snapshot(out)
    err = fail(["demo", "--out", str(out), "--methods", "zeroshot", "scenario.n_tasks=1"], capsys)
    assert "holds no clipcl demo output" in err and "--overwrite" not in err  # no invitation to overwrite
    err = fail(["demo", "--out", str(out), "--methods", "zeroshot", "scenario.n_tasks=1", "--overwrite"], capsys)
    assert "holds no clipcl demo output" in err
    assert snapshot(out) == before


def test_demo_overwrite_replaces_its_own_output_and_keeps_the_users(tmp_path, capsys):
    out = tmp_path / "d"
    argv = ["demo", "--out", str(out), "--methods", "zeroshot", *ZEROSHOT, "--quiet"]
    assert main(argv) == 0
    assert owned.kind_of(out) == "demo" and {"summary.md", "comparison.png"} <= set(owned.read_marker(out)["files"])
    (out / "mine.txt").write_text("keep me")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "mine.txt").read_text() == "keep me" and (out / "summary.md").is_file()
    assert "kept 1 entries" in capsys.readouterr().err


def test_demo_refuses_a_method_folder_that_is_a_planted_link(tmp_path, capsys):
    out, elsewhere = tmp_path / "d", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    out.mkdir()
    owned.create_marker(out, "demo")
    (out / "zeroshot").symlink_to(elsewhere, target_is_directory=True)
    before, outside = snapshot(out), snapshot(elsewhere)
    err = fail(["demo", "--out", str(out), "--methods", "zeroshot", *ZEROSHOT, "--overwrite"], capsys)
    assert "symbolic link" in err and str(out / "zeroshot") in err
    assert snapshot(out) == before and snapshot(elsewhere) == outside


# ---------------------------------------------------------------------- single output files
def test_report_plot_never_replaces_a_users_file(finished, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    err = fail(["report", str(finished), "--plot", str(notes)], capsys)
    assert str(notes) in err and "not written by clipcl" in err and notes.read_text() == "my notes"
    png = tmp_path / "my.png"  # a PNG of the user's (no clipcl mark)
    shutil.copy(finished / "accuracy.png", png)
    owned_png = png.read_bytes()
    png.write_bytes(owned_png.replace(b"clipcl", b"Matplo"))
    before = png.read_bytes()
    err = fail(["report", str(finished), "--plot", str(png)], capsys)
    assert "not written by clipcl" in err and png.read_bytes() == before


def test_report_plot_replaces_its_own_earlier_plot(finished, tmp_path, capsys):
    plot = tmp_path / "cmp.png"
    assert main(["report", str(finished), "--plot", str(plot)]) == 0
    first = plot.stat().st_mtime_ns
    time.sleep(0.01)
    assert main(["report", str(finished), "--plot", str(plot)]) == 0
    assert owned.written_by_clipcl(plot) and plot.stat().st_mtime_ns != first


@pytest.mark.parametrize("kind", ["text", "link"])
def test_bench_json_never_replaces_a_users_file(kind, tmp_path, capsys):
    target, other = tmp_path / "existing.txt", tmp_path / "other.txt"
    other.write_text("linked")
    if kind == "text":
        target.write_text("my figures")
    else:
        target.symlink_to(other)
    before = snapshot(tmp_path)
    err = fail(["bench", "fmnist-cil", "--steps", "1", "--json", str(target)], capsys)
    assert str(target) in err and snapshot(tmp_path) == before


# ---------------------------------------------------------------------- planted folder links
def stopped_run(tmp_path: Path) -> Path:
    """A two-task run killed (SIGKILL) right after its first checkpoint."""
    out = tmp_path / "run"
    code = subprocess.run([sys.executable, "-c", DIE_AFTER_SAVE, "run", "fmnist-cil", *TWO_TASKS, "--out", str(out),
                           "--quiet"], env={**ENV, "DIE_AFTER_SAVE": "1"}).returncode
    assert code == -signal.SIGKILL and (out / "checkpoint.pt").is_file()
    return out


@pytest.mark.skipif(find_spec("tensorboard") is None, reason="needs tensorboard")
def test_resume_with_tensorboard_refuses_a_planted_tensorboard_link(tmp_path, capsys):
    out, elsewhere = stopped_run(tmp_path), tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    (out / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(elsewhere)
    err = fail(["run", "fmnist-cil", *TWO_TASKS, "log.tensorboard=true", "--out", str(out), "--resume"], capsys,
               code=4)
    assert "symbolic link" in err and str(out / "tensorboard") in err
    assert snapshot(elsewhere) == before  # nothing written where the link points
    (out / "tensorboard").unlink()  # the link removed, the same command resumes
    assert main(["run", "fmnist-cil", *TWO_TASKS, "log.tensorboard=true", "--out", str(out), "--resume",
                 "--quiet"]) == 0
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    assert main(["run", "fmnist-cil", *ZEROSHOT, "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "tensorboard").exists()  # its event files were listed, and removed with the run


def test_a_planted_sweep_logs_link_is_refused(tmp_path, capsys):
    out, elsewhere = tmp_path / "sweep", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    owned.create_marker(out, "sweep")
    (out / "logs").symlink_to(elsewhere, target_is_directory=True)
    err = fail(["sweep", "fmnist-cil", "tiny", "--out", str(out)], capsys, code=4)
    assert "symbolic link" in err and str(out / "logs") in err
    assert list(elsewhere.iterdir()) == [] and not (out / "sweep.json").exists()


def test_a_sweep_cell_replaced_by_a_link_after_the_start_is_not_written_through(tmp_path, capsys):
    out, elsewhere = tmp_path / "sweep", tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = out / "er__memory.per_class-1"

    def command(config, overrides, folder, action):  # the first cell, while it runs, plants a link for the next
        plant = f"pathlib.Path({str(victim)!r}).symlink_to({str(elsewhere)!r})" if folder.name.startswith("zero") else ""
        return [sys.executable, "-c", "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(exist_ok=True); "
                f"(p / 'ran.txt').write_text('x'); {plant}", str(folder)]

    code = sweep.run("fmnist-cil", "tiny", [], out, jobs=1, threads=1, command=command)
    assert code == 1 and list(elsewhere.iterdir()) == []
    cells = {c["folder"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert cells["er__memory.per_class-1"]["status"] == "failed" and "symbolic link" in cells["er__memory.per_class-1"]["note"]


# ---------------------------------------------------------------------- a sweep's folder
def test_sweep_never_writes_among_a_users_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = snapshot(out)
    err = fail(["sweep", "fmnist-cil", "tiny", "--out", str(out)], capsys)
    assert "holds no clipcl sweep" in err and str(out) in err
    assert snapshot(out) == before


# ---------------------------------------------------------------------- a run killed before its first checkpoint
def killed_before_first_checkpoint(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    code = subprocess.run([sys.executable, "-c", DIE_BEFORE_FIRST_SAVE, "run", "fmnist-cil", *TWO_TASKS, "--out",
                           str(out), "--quiet"], env=ENV).returncode
    assert code == -signal.SIGKILL
    assert not (out / "checkpoint.pt").exists() and (out / "log.csv").is_file()
    return out


@pytest.mark.parametrize("how", ["run", "overwrite", "sweep"])
def test_a_run_killed_before_its_first_checkpoint_restarts_cleanly(how, tmp_path, capsys):
    """The folder holds only what that run wrote (log.csv, its marker, a stale lock): it is that run's."""
    out = killed_before_first_checkpoint(tmp_path)
    assert (out / owned.LOCK_NAME).exists()  # left by the killed process: taken over
    if how == "sweep":
        grid = tmp_path / "grid.yaml"
        grid.write_text("overrides: [" + ", ".join(TWO_TASKS) + "]\ngrid:\n  seed: [0]\n")
        folder = tmp_path / "sw"
        assert main(["sweep", "fmnist-cil", str(grid), "--out", str(folder), "--jobs", "1"]) == 0  # make the sweep
        cell = folder / "seed-0"
        shutil.rmtree(cell)
        shutil.copytree(out, cell)
        assert main(["sweep", "fmnist-cil", str(grid), "--out", str(folder), "--jobs", "1"]) == 0
        assert json.loads((folder / "sweep.json").read_text())["cells"][0]["status"] == "finished"
        out = cell
    else:
        assert main(["run", "fmnist-cil", *TWO_TASKS, "--out", str(out), "--quiet",
                     *(["--overwrite"] if how == "overwrite" else [])]) == 0
        if how == "run":
            assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["complete"] is True
    assert not (out / owned.LOCK_NAME).exists()


def test_resume_of_a_run_killed_before_its_first_checkpoint_says_how_to_restart(tmp_path, capsys):
    out = killed_before_first_checkpoint(tmp_path)
    before = snapshot(out)
    err = fail(["resume", str(out)], capsys)
    assert "stopped before its first checkpoint" in err and f"clipcl run CONFIG --out {out}" in err
    assert snapshot(out) == before


def test_a_user_file_beside_a_killed_run_still_needs_overwrite(tmp_path, capsys):
    out = killed_before_first_checkpoint(tmp_path)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    err = fail(["run", "fmnist-cil", *TWO_TASKS, "--out", str(out)], capsys)
    assert "--overwrite" in err and snapshot(out) == before


# ---------------------------------------------------------------------- two processes, one folder
@pytest.mark.parametrize("first, second", [
    ("run", "resume"), pytest.param("run", "overwrite", marks=pytest.mark.slow),
    pytest.param("resume", "run-resume", marks=pytest.mark.slow), ("resume", "overwrite")])
def test_a_second_process_on_a_folder_in_use_is_told_who_holds_it(first, second, finished, tmp_path, capsys):
    out = stopped_run(tmp_path) if first == "resume" else tmp_path / "run"
    argv = {"run": ["run", "fmnist-cil", *TWO_TASKS, "--out", str(out)], "resume": ["resume", str(out)]}[first]
    proc = holding(argv)
    try:
        before = snapshot(out)
        second_argv = {"resume": ["resume", str(out)],
                       "run-resume": ["run", "fmnist-cil", *TWO_TASKS, "--out", str(out), "--resume"],
                       "overwrite": ["run", "fmnist-cil", *TWO_TASKS, "--out", str(out), "--overwrite"]}[second]
        err = fail(second_argv, capsys)
        assert f"is in use by clipcl (pid {proc.pid}" in err and "Wait for it to finish" in err
        assert snapshot(out) == before
    finally:
        proc.kill()
        proc.wait()


def test_a_second_sweep_on_a_folder_in_use_is_told_who_holds_it(tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    owned.create_marker(out, "sweep")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from clipcl import owned; "
                               "owned.FolderLock(sys.argv[1], 'sweep').acquire(); print('READY', flush=True); "
                               "time.sleep(120)", str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "READY"
        before = snapshot(out)
        err = fail(["sweep", "fmnist-cil", "tiny", "--out", str(out)], capsys)
        assert f"pid {holder.pid}" in err and snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    code = sweep.run("fmnist-cil", "tiny", [], out, jobs=1, threads=1, command=lambda c, o, f, a: [
        sys.executable, "-c", "import pathlib, sys; pathlib.Path(sys.argv[1]).mkdir()", str(f)])
    assert code == 0  # the dead holder's lock is taken over


def test_the_lock_is_exclusive_within_one_process_and_released(tmp_path):
    a = owned.FolderLock(tmp_path).acquire()
    with pytest.raises(Exception, match="in use by clipcl"):
        owned.FolderLock(tmp_path).acquire()
    assert owned.holder(tmp_path) is not None
    a.release()
    assert owned.holder(tmp_path) is None and not (tmp_path / owned.LOCK_NAME).exists()
    with owned.FolderLock(tmp_path):
        pass


# ---------------------------------------------------------------------- names the file system cannot hold
@pytest.mark.parametrize("command", ["run", "sweep", "demo"])
@pytest.mark.parametrize("shape", ["long name", "long path"])
def test_out_names_too_long_for_the_file_system_are_one_line(command, shape, tmp_path, capsys):
    out = tmp_path / ("x" * 300) if shape == "long name" else tmp_path.joinpath(*["y" * 200] * 23)
    argv = {"run": ["run", "fmnist-cil", *ZEROSHOT], "sweep": ["sweep", "fmnist-cil", "tiny"],
            "demo": ["demo", "--methods", "zeroshot", *ZEROSHOT]}[command]
    err = fail([*argv, "--out", str(out)], capsys)
    assert ("bytes long" in err) and ("shorter" in err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("entry", ["/tmp/elsewhere.txt", "../outside.txt", "a/b/c", ""])
def test_a_hand_edited_marker_pointing_outside_its_folder_is_not_clipcls(entry, finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("mine")
    marker = json.loads((out / owned.MARKER_NAME).read_text())
    marker["files"].append(entry.replace("/tmp/elsewhere.txt", str(outside)))
    (out / owned.MARKER_NAME).write_text(json.dumps(marker))
    before = snapshot(tmp_path)
    err = fail(["run", "fmnist-cil", *ZEROSHOT, "--out", str(out), "--overwrite"], capsys)
    assert "holds no clipcl run" in err and snapshot(tmp_path) == before


def test_overwrite_removes_nothing_through_a_listed_folder_replaced_by_a_link(finished, tmp_path, capsys):
    out, victim = copy_run(finished, tmp_path), tmp_path / "victim"
    victim.mkdir()
    (victim / "a.txt").write_text("mine")
    owned.add_files(out, ["sub/", "sub/a.txt"])
    (out / "sub").symlink_to(victim, target_is_directory=True)
    assert main(["run", "fmnist-cil", *ZEROSHOT, "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert (victim / "a.txt").read_text() == "mine"
