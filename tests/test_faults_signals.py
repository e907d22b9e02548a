"""Stops and command-line slips, tried as a user would: a closed terminal (SIGHUP) stops a run or a sweep as
SIGTERM does (a checkpoint, one line, `clipcl resume DIR`), a stopped or killed pretraining leaves nothing in
the cache, and overrides put where a user puts them are understood or refused in one line that says why.

Covers: SIGHUP to `clipcl run` (then resumed bit for bit) and to `clipcl sweep`; nohup's ignored SIGHUP;
SIGINT, SIGTERM and SIGHUP during a pretraining; a stop during the pretraining's final rename; the
temporary folders of pretrainings killed with SIGKILL; two processes pretraining one recipe at once;
overrides after --out; overrides with --resume and no config; a pickled weights file.
"""
from __future__ import annotations

import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipcl import checkpoint, pretrain, sweep
from clipcl.cli import build_parser, main
from clipcl.errors import stop_signals
from cli_checks import assert_same_run, fail, snapshot

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "PYTHONUNBUFFERED": "1"}
_script = Path(sys.executable).parent / "clipcl"
CLIPCL = [str(_script)] if _script.is_file() else [sys.executable, "-m", "clipcl.cli"]
TIMEOUT = 240
# 2 tasks of 10 steps (2 epochs of 120 images in batches of 24), a checkpoint every 2 steps
RUN = ["fmnist-cil", "scenario.train_per_class=60", "scenario.test_per_class=20", "scenario.n_tasks=2",
       "optim.epochs=2", "optim.batch_size=24", "checkpoint_every=2", "method.name=er", "memory.per_class=3"]
TINY = ["scenario.train_per_class=20", "scenario.test_per_class=10", "scenario.n_tasks=1", "optim.epochs=1",
        "optim.batch_size=16", "memory.per_class=2", "eval.batch_size=64"]
TINY_RECIPE = ("a tiny test recipe on the washed pretraining block",
               ["name=pretrain-test", "seed=0", "scenario.dataset=fmnist_pretrain", "scenario.classes_per_task=10",
                "scenario.class_order=natural", "scenario.train_per_class=20", "scenario.test_per_class=5",
                "memory.per_class=0", "method.name=joint", "optim.epochs=1", "optim.batch_size=32"])
# the outer run of a pretrained start, small: it never gets past the pretraining in the tests that stop it
PRE_RUN = ["fmnist-pre-cil", "model.pretrained=clipcl:test-tiny", *TINY]


@pytest.fixture
def tiny_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPCL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPES, "test-tiny", TINY_RECIPE)
    return tmp_path / "cache"


def one_line(err: str) -> str:
    """The one 'clipcl: interrupted' line of err, its last line (no traceback, no error line besides)."""
    assert "Traceback" not in err and "clipcl: error" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("clipcl: interrupted")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    return lines[0]


# ---------------------------------------------------------------------- SIGHUP: a closed terminal or ssh session
def test_sighup_mid_task_checkpoints_says_how_to_resume_and_resumes_bit_exact(tmp_path):
    out, ref = tmp_path / "run", tmp_path / "reference"
    reference = subprocess.Popen([*CLIPCL, "run", *RUN, "--out", str(ref), "--quiet"], env=ENV,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # alongside: 2 cores
    proc = subprocess.Popen([*CLIPCL, "run", *RUN, "--out", str(out)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / checkpoint.CHECKPOINT_NAME).is_file():  # the first mid-task checkpoint (task 0 step 2)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGHUP, err
    line = one_line(err)
    assert line == f"clipcl: interrupted by SIGHUP; checkpoint written. Continue with: clipcl resume {out}"
    progress = checkpoint.load(out / checkpoint.CHECKPOINT_NAME)["progress"]
    assert progress["task"] < 2 and (progress["task"], progress["step"]) != (0, 0)  # stopped on the way
    assert not (out / "results.json").exists() or not json.loads((out / "results.json").read_text())["complete"]

    # the command the message gives, as a user would copy it
    command = shlex.split(line.split("Continue with: ", 1)[1])
    done = subprocess.run([*CLIPCL, *command[1:]], env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert reference.wait(timeout=TIMEOUT) == 0, reference.communicate()
    assert_same_run(out, ref)


HANGUP_SLEEPER = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
def stop(signum, frame):
    (out / "stopped.txt").write_text(str(signum)); sys.exit(128 + signum)
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, stop)
(out / "started.txt").write_text("")
time.sleep(120)
"""
SWEEP_OF_SLEEPERS = f"""
import signal, sys
from pathlib import Path
from clipcl import sweep
def command(config, overrides, out, action):
    return [sys.executable, "-c", {HANGUP_SLEEPER!r}, str(out)]
code = sweep.run("fmnist-cil", "tiny", [], Path(sys.argv[1]), jobs=2, threads=1, command=command)
print("SIGHUP handler put back:", signal.getsignal(signal.SIGHUP) == signal.SIG_DFL)
sys.exit(code)
"""
TINY_CELLS = ["zeroshot__memory.per_class-1", "er__memory.per_class-1", "er__memory.per_class-2"]


def test_sighup_to_a_sweep_is_passed_on_to_its_cells(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-c", SWEEP_OF_SLEEPERS, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("*/started.txt"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)  # to the sweep only: it passes the signal on to its cells
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGHUP, stderr
    started = sorted(p.parent.name for p in out.glob("*/started.txt"))
    assert started == sorted(TINY_CELLS[:2])
    assert [(out / n / "stopped.txt").read_text() for n in started] == [str(int(signal.SIGHUP))] * 2
    cells = {c["folder"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert [cells[n]["status"] for n in TINY_CELLS] == ["interrupted", "interrupted", "not started"]
    assert "run the same command again" in stderr and "Traceback" not in stderr
    assert "SIGHUP handler put back: True" in stdout


def test_under_nohup_a_hang_up_does_not_stop_a_run(monkeypatch):
    """nohup ignores SIGHUP so that the run outlives its terminal: the run and the sweep leave it ignored."""
    assert signal.SIGHUP in stop_signals()
    monkeypatch.setattr(signal, "getsignal", lambda s: signal.SIG_IGN if s == signal.SIGHUP else signal.SIG_DFL)
    assert stop_signals() == (signal.SIGINT, signal.SIGTERM)


# ---------------------------------------------------------------------- pretraining: nothing stale in the cache
def test_sigterm_during_pretraining_removes_its_folder_and_says_so_in_one_line(tmp_path):
    """The real recipe, stopped from outside once its training folder exists."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    env = {**ENV, "CLIPCL_CACHE": str(cache)}
    proc = subprocess.Popen([*CLIPCL, "run", "fmnist-pre-cil", *TINY, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list((cache / "pretrained").glob(".pretraining-*/run")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        time.sleep(0.5)  # training
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = one_line(err)
    assert line.startswith("clipcl: interrupted by SIGTERM while pretraining clipcl:fmnist-washed; nothing was "
                           "cached and its temporary folder was removed"), line
    assert line.endswith("the next run that needs it starts it again).")
    assert list((cache / "pretrained").iterdir()) == []  # no weights, no temporary folder
    assert not out.exists()  # the run had not started: no folder to resume


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_every_stop_signal_during_pretraining_is_one_clean_line(sig, tiny_recipe, tmp_path, monkeypatch, capsys):
    from clipcl.engine import Trainer

    real_step, calls = Trainer.train_step, []

    def step_then_signal(self, *args, **kwargs):  # only the pretraining trains: the run waits for its weights
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    before = {s: signal.getsignal(s) for s in stop_signals()}
    code = main(["run", *PRE_RUN, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 128 + sig
    line = one_line(err)
    assert line.startswith(f"clipcl: interrupted by {sig.name} while pretraining clipcl:test-tiny; nothing was cached")
    assert list((tiny_recipe / "pretrained").iterdir()) == [] and not (tmp_path / "run").exists()
    assert {s: signal.getsignal(s) for s in stop_signals()} == before  # the handlers are put back
    assert len(calls) == 2  # it stopped at once, not at the end of the pretraining


def test_a_stop_during_the_final_rename_waits_and_says_the_weights_were_cached(tiny_recipe, tmp_path, monkeypatch,
                                                                              capsys):
    real_replace = os.replace

    def signal_then_replace(src, dst):
        if Path(src).name == "weights.pt":  # the pretraining's own file, renamed into the cache
            os.kill(os.getpid(), signal.SIGTERM)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", signal_then_replace)
    code = main(["run", *PRE_RUN, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM
    line = one_line(err)
    cached = list((tiny_recipe / "pretrained").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".pt"  # the weights, whole; no temporary folder
    assert line.startswith("clipcl: interrupted by SIGTERM while pretraining clipcl:test-tiny, just after its "
                           f"weights were cached in '{cached[0]}'")
    assert torch.load(cached[0], weights_only=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert main(["run", *PRE_RUN, "method.name=zeroshot", "--out", str(tmp_path / "run")]) == 0
    assert "pretraining" not in capsys.readouterr().err  # the next run loads them


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_later_pretraining_clears_temporaries_of_killed_ones_and_nothing_else(tiny_recipe, tmp_path):
    folder = tiny_recipe / "pretrained"
    folder.mkdir(parents=True)
    host, dead = pretrain._host(), _dead_pid()
    stale = folder / f".pretraining-{host}-{dead}-k1lled00"  # a pretraining that died by SIGKILL
    (stale / "run").mkdir(parents=True)
    (stale / "run" / "checkpoint.pt").write_bytes(os.urandom(64))
    (stale / ".weights.pt.tmp-abc").write_bytes(b"half a file")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("not the cache's")
    kept = {  # what is not a stale temporary of this host: left byte for byte
        f".pretraining-{host}-{os.getppid()}-alive000": "dir",  # a live process (this one's parent)
        f".pretraining-elsewhere-{dead}-other000": "dir",  # another host's (a shared cache): cannot tell
        ".pretraining-x1y2z3w4": "dir",  # an older clipcl's, with no host and pid recorded
        f".pretraining-{host}-{dead}-afile000": "file",  # a file of that name
        f".pretraining-{host}-{dead}-alink000": "link",  # a link of that name, to a folder outside
        "fmnist-washed-clipcl-tiny-rn-cpu-0123456789ab.pt": "file",  # other cached weights
        "notes.txt": "file",
    }
    for name, kind in kept.items():
        if kind == "dir":
            (folder / name).mkdir()
            (folder / name / "data.bin").write_bytes(os.urandom(32))
        elif kind == "file":
            (folder / name).write_bytes(os.urandom(32))
        else:
            (folder / name).symlink_to(outside, target_is_directory=True)
    (tiny_recipe / "mine.txt").write_text("the user's own file in the cache")
    before = {k: v for k, v in snapshot(tiny_recipe).items() if not k.startswith(f"pretrained/{stale.name}")}
    before_outside = snapshot(outside)

    path = pretrain.weights("test-tiny", "clipcl-tiny-rn", quiet=True)
    assert not stale.exists()
    after = snapshot(tiny_recipe)
    assert after.pop(str(path.relative_to(tiny_recipe)))  # the new weights, and nothing else new
    assert after == before and snapshot(outside) == before_outside
    assert sorted(p.name for p in folder.iterdir()) == sorted([*kept, path.name])


TWO_PRETRAININGS = """
import sys
from clipcl import pretrain
pretrain.RECIPES["test-tiny"] = ({doc!r}, {overrides!r})
print(pretrain.weights("test-tiny", "clipcl-tiny-rn", quiet=True))
""".format(doc=TINY_RECIPE[0], overrides=TINY_RECIPE[1])


def test_two_processes_pretraining_one_recipe_at_once_leave_one_whole_file(tmp_path):
    """Each trains in its own temporary folder and renames a whole file into place: the last rename wins, both
    hold the same bits, and a reader never sees half a file (no lock: the cost is one pretraining twice)."""
    env = {**ENV, "CLIPCL_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PRETRAININGS], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary folder or file left
    state = torch.load(path, weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())


# ---------------------------------------------------------------------- overrides where a user puts them
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-task er run, written with its overrides after --out."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "fmnist-cil", "--out", str(out), *TINY, "method.name=er", "--quiet"]) == 0
    return out


def test_overrides_after_out_are_accepted_by_run(finished):
    config = json.loads((finished / "results.json").read_text())["config"]
    assert config["method"]["name"] == "er" and config["scenario"]["train_per_class"] == 20


@pytest.mark.parametrize("argv, expected", [
    (["sweep", "fmnist-cil", "--out", "d", "tiny", "optim.lr=0.01"], ("fmnist-cil", "tiny", ["optim.lr=0.01"])),
    (["sweep", "fmnist-cil", "tiny", "--out", "d", "--jobs", "2", "seed=1", "optim.lr=0.01"],
     ("fmnist-cil", "tiny", ["seed=1", "optim.lr=0.01"])),
    (["sweep", "--out", "d", "fmnist-cil", "tiny"], ("fmnist-cil", "tiny", [])),
])
def test_overrides_after_out_are_accepted_by_sweep(argv, expected, monkeypatch):
    seen = []
    monkeypatch.setattr(sweep, "run", lambda config, grid, overrides, out, **kw: seen.append(
        (config, grid, overrides, str(out))) or 0)
    assert main(argv) == 0
    assert seen == [(*expected, "d")]


@pytest.mark.parametrize("argv, key, value", [
    (["demo", "--out", "d", "method.lr=1", "--methods", "er"], "overrides", ["method.lr=1"]),
    (["bench", "fmnist-cil", "--steps", "3", "method.name=gdro"], "overrides", ["method.name=gdro"]),
    (["run", "--resume", "--out", "d", "method.name=er"], "config", "method.name=er"),  # cmd_run sorts it out
])
def test_overrides_after_options_parse_for_demo_and_bench(argv, key, value):
    assert getattr(build_parser().parse_args(argv), key) == value


def test_resume_without_config_keeps_the_stored_config_and_says_so(finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    err = fail(["run", "--resume", "--out", str(out), "method.name=gdro", "seed=3"], capsys)
    assert err == ("clipcl: error: method.name=gdro seed=3: with --resume and no config the run continues with the "
                   "config stored in its checkpoint, and only log.* may change on resume. Drop the overrides, or "
                   "start a new run in another folder with them.")
    assert "neither a file" not in err and snapshot(out) == before
    # log.* does not change what is trained (checkpoint.RESUME_FREE): accepted on the stored config
    assert main(["run", "--resume", "--out", str(out), "log.every=3", "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["log"]["every"] == 3


def test_an_override_where_the_config_goes_says_the_config_is_missing(tmp_path, capsys):
    err = fail(["run", "--out", str(tmp_path / "d"), "method.name=er"], capsys)
    assert "needs a config" in err and "before the overrides" in err and "neither a file" not in err
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------- a weights file that could run code
class _Planted:
    """Unpickled by plain pickle, it would run a shell command (what a planted weights file could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("kind", ["module", "planted"])
def test_a_pickled_weights_file_is_refused_in_one_whole_line(kind, tmp_path, capsys):
    weights, marker = tmp_path / "some_pickled_file.pt", tmp_path / "ran.txt"
    if kind == "module":  # a whole module, pickled: not a state dict
        torch.save({"model": torch.nn.Linear(2, 2)}, weights)
        found = "torch.nn.modules.linear.Linear"
    else:
        weights.write_bytes(pickle.dumps({"state_dict": _Planted(marker)}, protocol=2))
        found = f"{os.system.__module__}.system"
    err = fail(["run", "fmnist-cil", *TINY, f"model.pretrained={weights}", "--out", str(tmp_path / "o")], capsys)
    assert err == (f"clipcl: error: config key 'model.pretrained' = '{weights}': clipcl refuses this file: it holds "
                   f"pickled Python objects ({found}), and loading those could run code. If you trust its source, "
                   "load it with torch.load(..., weights_only=False), re-save the model's weights as a plain state "
                   "dict (torch.save(model.state_dict(), 'weights.pt'), or a .safetensors file) and give that file.")
    assert "\x1b" not in err and not marker.exists() and not (tmp_path / "o").exists()


def test_a_file_that_is_no_pickle_is_not_said_to_hold_objects(tmp_path, capsys):
    weights = tmp_path / "notes.pt"
    weights.write_bytes(b"not a checkpoint\n" * 20)
    err = fail(["run", "fmnist-cil", *TINY, f"model.pretrained={weights}", "--out", str(tmp_path / "o")], capsys)
    assert f"'{weights}': this file is not a clipcl-tiny-rn checkpoint that open_clip can load" in err
    assert "pickled Python objects" not in err and "can still be loaded" not in err and err.endswith("model.name.")
