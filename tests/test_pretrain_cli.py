"""`clipcl pretrain ROOT --out WEIGHTS.pt`: a tiny CLIP made from a user's image folder (both towers trained), its
zero-shot accuracy on the folder's test images measured and recorded, and the weights loaded by `clipcl run`."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import clipcl.engine
from clipcl import pretrain
from clipcl.cli import main
from clipcl.config import ModelCfg, ScenarioCfg
from clipcl.data.datasets import flat_test_positions, load_dataset
from clipcl.models import create

# Four classes a tiny CLIP tells apart in a few dozen steps: a colour and a shape each, on a dark background.
SHAPES = {"red_square": (220, 30, 30), "green_circle": (30, 200, 40), "blue_cross": (40, 60, 230),
          "yellow_bar": (230, 220, 30)}
# a few dozen steps on ~70 images (the defaults, batch 128 for 8 epochs, are for folders of thousands)
FAST = ["optim.batch_size=16", "optim.epochs=10", "optim.warmup_steps=5", "scenario.decode_workers=0"]
TINY_RECIPE = ("a tiny test recipe on the washed pretraining block",
               ["name=pretrain-test", "seed=0", "scenario.dataset=fmnist_pretrain", "scenario.classes_per_task=10",
                "scenario.class_order=natural", "scenario.train_per_class=20", "scenario.test_per_class=5",
                "memory.per_class=0", "method.name=joint", "optim.epochs=1", "optim.batch_size=32"])


def shape_image(path: Path, name: str, rng: np.random.Generator, colour_of: str = "") -> None:
    """A 32x32 PNG of the class `name`: its shape in its colour (or in that of class `colour_of`), jittered, at a
    random place."""
    img = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 60, 3)))
    draw = ImageDraw.Draw(img)
    x, y = (int(v) for v in rng.integers(2, 12, 2))
    colour = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in SHAPES[colour_of or name])
    shape = name.split("_")[1]
    if shape == "square":
        draw.rectangle([x, y, x + 16, y + 16], fill=colour)
    elif shape == "circle":
        draw.ellipse([x, y, x + 16, y + 16], fill=colour)
    elif shape == "cross":
        draw.line([x, y, x + 16, y + 16], fill=colour, width=4)
        draw.line([x, y + 16, x + 16, y], fill=colour, width=4)
    else:
        draw.rectangle([x, y + 6, x + 18, y + 10], fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def write_shapes(root: Path, flat: bool, counts: dict[str, int] | None = None, seed: int = 0,
                 conflicting: bool = False) -> Path:
    """ROOT/<class>/*.png (flat) or ROOT/train|test/<class>/*.png (every fifth image a test image); with
    `conflicting`, every third image of a class has the next class's colour (its shape alone tells it), so that the
    accuracy is neither chance nor 100% and says which model and which images it was measured on."""
    rng = np.random.default_rng(seed)
    names = list(SHAPES)
    for k, name in enumerate(names):
        for i in range((counts or {}).get(name, 20)):
            split = "" if flat else "test" if i % 5 == 0 else "train"
            other = names[(k + 1) % len(names)] if conflicting and i % 3 == 1 else ""
            shape_image(root / split / name / f"{i:03d}.png", name, rng, other)
    return root


def cli(argv: list[str]) -> tuple[int, str]:
    """main(argv) with its stderr (fixtures of module scope have no capsys)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("clipcl: error: ") and "Traceback" not in err, err
    return lines[0]


def hand_accuracy(weights: Path, model_name: str, classes: list[str], images: torch.Tensor,
                  labels: np.ndarray) -> float:
    """Zero-shot accuracy of the weights file loaded as `clipcl run` loads model.pretrained (models.create),
    computed here by hand: 'a photo of a {}.' per class, nearest normalised text embedding."""
    bundle = create(ModelCfg(name=model_name, pretrained=str(weights)))
    model = bundle.model.eval()
    tokens = open_clip.get_tokenizer(model_name)([f"a photo of a {c}." for c in classes])
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokens), dim=-1)
        z = F.normalize(model.encode_image(bundle.prepare_images(images)), dim=-1)
    return float(((z @ text.T).argmax(1).numpy() == labels).mean())


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """A flat folder pretrained once: (root, weights, record, stderr, the model's initial state)."""
    base = tmp_path_factory.mktemp("flat")
    root, out = write_shapes(base / "shapes", flat=True, conflicting=True), base / "weights.pt"
    initial, real = [], clipcl.engine.create

    def recording(*args, **kwargs):  # the model the pretraining starts from, as the trainer built it
        bundle = real(*args, **kwargs)
        initial.append({k: v.detach().clone() for k, v in bundle.model.state_dict().items()})
        return bundle

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(clipcl.engine, "create", recording)
        code, err = cli(["pretrain", str(root), "--out", str(out), *FAST])
    assert code == 0, err
    assert len(initial) == 1
    return root, out, json.loads(out.with_suffix(".json").read_text()), err, initial[0]


def test_flat_folder_pretraining_learns_its_classes_and_records_the_real_accuracy(flat):
    root, out, record, err, _ = flat
    assert record["written_by"] == "clipcl" and record["kind"] == "pretrained" and record["model"] == "clipcl-tiny-rn"
    assert record["classes"] == ["blue cross", "green circle", "red square", "yellow bar"]  # '_' as spaces, sorted
    assert record["test_images"] == 4 * 2 and record["train_images"] == 4 * 18  # a tenth of 20 per class
    assert record["config"]["model"]["lock_text"] is False and record["config"]["method"]["name"] == "joint"
    assert record["config"]["scenario"]["classes_per_task"] == 4 and record["config"]["scenario"]["image_size"] == 32
    assert record["zero_shot_accuracy"] > 1 / 4 + 0.2  # well above chance on the held-out images (6 of 8 here)
    ds = load_dataset(ScenarioCfg(dataset="imagefolder", root=str(root), image_size=32, decode_workers=0))
    x = ds.test.load(np.arange(len(ds.test)))
    assert hand_accuracy(out, "clipcl-tiny-rn", ds.classnames, x, ds.test.targets) == record["zero_shot_accuracy"]
    assert f"zero-shot accuracy {100 * record['zero_shot_accuracy']:.1f}% on 8 test images" in err
    # a plain state dict (loadable without running code), described by its record
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert record["sha256"] == pretrain._sha256(out) and record["weights"] == out.name
    assert not list(out.parent.glob(".pretraining-*"))  # the training folder is gone


def test_both_towers_are_trained(flat):
    _, out, _, _, initial = flat
    state = torch.load(out, weights_only=True)
    assert state.keys() == initial.keys()
    text = [k for k in state if not k.startswith("visual.") and k != "logit_scale"]
    assert "token_embedding.weight" in text and "text_projection" in text and len(text) > 20
    unchanged = [k for k in text if torch.equal(state[k], initial[k])]
    assert unchanged == []  # every tensor of the text tower moved: it was unlocked and got gradients
    visual = [k for k in state if k.startswith("visual.") and state[k].is_floating_point()]
    assert all(not torch.equal(state[k], initial[k]) for k in visual if k.endswith("weight"))


def test_flat_layout_holds_out_a_seeded_tenth_of_each_class_disjoint_from_training(tmp_path):
    counts = {"red_square": 20, "green_circle": 15, "blue_cross": 9, "yellow_bar": 1}
    root = write_shapes(tmp_path / "shapes", flat=True, counts=counts)
    cfg = ScenarioCfg(dataset="imagefolder", root=str(root), image_size=32, decode_workers=0)
    ds = load_dataset(cfg)
    assert ds.classnames == ["blue cross", "green circle", "red square", "yellow bar"]
    names = sorted(SHAPES)
    train = [ds.train.store.paths[i] for i in ds.train.index]
    test = [ds.test.store.paths[i] for i in ds.test.index]
    per_class = {c: int((ds.test.targets == y).sum()) for y, c in enumerate(names)}
    assert per_class == {"blue_cross": 1, "green_circle": 1, "red_square": 2, "yellow_bar": 0}  # n // 10, >= 1 of 2+
    assert [Path(p).parent.name for p in test] == [names[y] for y in ds.test.targets]  # labels follow the folders
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(str(p) for p in root.rglob("*.png"))
    assert any("without test images" in w and "yellow_bar" in w for w in ds.notes["warnings"])
    # seeded: the same files every time, and a class's files whatever the other classes
    assert [ds.test.store.paths[i] for i in load_dataset(cfg).test.index] == test
    shutil.rmtree(root / "green_circle")
    again = load_dataset(cfg)
    assert sorted(again.test.store.paths[i] for i in again.test.index) == sorted(p for p in test if "green" not in p)
    assert flat_test_positions(1, "x").tolist() == [] and len(flat_test_positions(2, "x")) == 1


def test_split_folder_weights_load_in_clipcl_run_with_the_recorded_zero_shot_accuracy(tmp_path):
    root = write_shapes(tmp_path / "shapes", flat=False)
    out = tmp_path / "weights.pt"
    code, err = cli(["pretrain", str(root), "--out", str(out), "--quiet", *FAST])
    assert code == 0 and err == "", err
    record = json.loads((tmp_path / "weights.json").read_text())
    assert record["layout"] == "split" and record["test_images"] == 4 * 4 and record["train_images"] == 4 * 16
    assert record["zero_shot_accuracy"] > 1 / 4 + 0.25
    run = tmp_path / "run"
    code, err = cli(["run", "fmnist-pre-cil", "scenario.dataset=imagefolder", f"scenario.root={root}",
                     f"model.pretrained={out}", "scenario.classes_per_task=2", "scenario.image_size=32",
                     "scenario.decode_workers=0", "optim.epochs=0.25", "optim.batch_size=16", "--out", str(run),
                     "--quiet"])
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    # before any training (unseen row 0): each task's test images among all four classes, i.e. the zero-shot
    # accuracy the record holds, split over the run's two tasks
    sizes = results["scenario"]["test_sizes"]
    zero_shot = sum(a * n for a, n in zip(results["unseen_matrix"][0], sizes)) / sum(sizes)
    assert zero_shot == pytest.approx(record["zero_shot_accuracy"], abs=1e-12)
    assert results["config"]["model"]["pretrained"] == str(out)


def test_an_existing_out_is_refused_unless_clipcl_pretrain_wrote_it_and_overwrite_is_given(flat, tmp_path):
    root, made, record, _, _ = flat
    out = tmp_path / "weights.pt"
    out.write_bytes(b"the user's own weights")
    code, err = cli(["pretrain", str(root), "--out", str(out), *FAST])
    line = error_line(err)
    assert code == 2 and str(out) in line and "not written by clipcl" in line
    assert out.read_bytes() == b"the user's own weights" and not (tmp_path / "weights.json").exists()
    out.unlink()
    (tmp_path / "weights.json").write_text('{"mine": true}')  # a record of the user's where clipcl writes its own
    code, err = cli(["pretrain", str(root), "--out", str(out), *FAST])
    assert code == 2 and str(tmp_path / "weights.json") in error_line(err)
    assert (tmp_path / "weights.json").read_text() == '{"mine": true}' and not out.exists()
    # clipcl pretrain's own output: refused without --overwrite; with it, a weights file its record does not
    # describe is still refused
    shutil.copy(made, out)
    shutil.copy(made.with_suffix(".json"), tmp_path / "weights.json")
    code, err = cli(["pretrain", str(root), "--out", str(out), *FAST])
    assert code == 2 and "--overwrite" in error_line(err) and pretrain._sha256(out) == record["sha256"]
    out.write_bytes(out.read_bytes()[:-1] + b"x")
    code, err = cli(["pretrain", str(root), "--out", str(out), "--overwrite", *FAST])
    assert code == 2 and "records other weights" in error_line(err)
    code, err = cli(["pretrain", str(root), "--out", str(tmp_path / "w.json"), *FAST])
    assert code == 2 and "ends in .json" in error_line(err)
    # weights.bin would share weights.pt's record weights.json: refused, even with --overwrite
    out.write_bytes(made.read_bytes())
    before = (tmp_path / "weights.json").read_bytes()
    code, err = cli(["pretrain", str(root), "--out", str(tmp_path / "weights.bin"), "--overwrite", *FAST])
    line = error_line(err)
    assert code == 2 and "is the record of" in line and str(out) in line
    assert (tmp_path / "weights.json").read_bytes() == before and not (tmp_path / "weights.bin").exists()


@pytest.mark.parametrize("case", ["missing", "a file", "empty", "empty class folders", "one class", "train only",
                                  "unknown recipe", "fixed key", "lora key", "unknown key", "bad value"])
def test_a_bad_root_or_override_is_one_error_line_and_writes_nothing(case, tmp_path):
    root, overrides = tmp_path / "data", []
    if case == "a file":
        root.write_text("not a folder")
    elif case == "empty":
        root.mkdir()
    elif case == "empty class folders":
        (root / "cat").mkdir(parents=True)
        (root / "dog").mkdir()
    elif case == "one class":
        write_shapes(root, flat=True, counts={n: 0 for n in SHAPES if n != "red_square"})
    elif case == "train only":
        write_shapes(root, flat=False)
        shutil.rmtree(root / "test")
    elif case in ("fixed key", "lora key", "unknown key", "bad value"):
        write_shapes(root, flat=True, counts={n: 2 for n in SHAPES})
        overrides = {"fixed key": ["method.name=er"], "lora key": ["model.lora_rank=4"], "unknown key": ["optim.lrr=1"],
                     "bad value": ["optim.epochs=-1"]}[case]
    source = "clipcl:nope" if case == "unknown recipe" else str(root)
    out = tmp_path / "weights.pt"
    code, err = cli(["pretrain", source, "--out", str(out), *overrides])
    line = error_line(err)
    assert code == 2
    expected = {"missing": "is not a folder", "a file": "is not a folder", "empty": "ROOT/<class>/*",
                "empty class folders": "nor class folders holding images", "one class": "at least 2 class folders",
                "train only": "no test/", "unknown recipe": "clipcl:fmnist-washed", "fixed key": "method.name",
                "lora key": "model.lora_rank", "unknown key": "optim.lrr", "bad value": "optim.epochs"}[case]
    assert expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if case in ("missing", "unknown recipe") else ["data"])


def test_a_recipe_tag_copies_its_cached_weights_with_the_accuracy_its_pretraining_measured(tmp_path, monkeypatch,
                                                                                           capsys):
    monkeypatch.setenv("CLIPCL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPES, "test-tiny", TINY_RECIPE)
    out = tmp_path / "w.pt"
    assert main(["pretrain", "clipcl:test-tiny", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    cached = pretrain.weights("test-tiny", "clipcl-tiny-rn", quiet=True)
    assert out.read_bytes() == cached.read_bytes()
    record = json.loads((tmp_path / "w.json").read_text())
    assert record["recipe"] == "clipcl:test-tiny" and record["test_images"] == 10 * 5 and len(record["classes"]) == 10
    # the pretraining's own figure (results' last accuracy, printed by pretrain.weights) is the recorded one
    assert f"clipcl:test-tiny: accuracy {100 * record['zero_shot_accuracy']:.1f}% on its own domain" in err
    cfg = pretrain.recipe_config("test-tiny", "clipcl-tiny-rn")
    from clipcl.data.scenarios import build_scenario

    test = build_scenario(cfg.scenario, cfg.seed)[0].test
    x = test.load(np.arange(len(test)))
    assert hand_accuracy(out, "clipcl-tiny-rn", record["classes"], x, test.targets) == record["zero_shot_accuracy"]
    # the next copy reads the record kept next to the cached weights: no training, no evaluation
    monkeypatch.setattr(clipcl.engine, "Trainer", None)
    monkeypatch.setattr(pretrain, "zero_shot_accuracy", None)
    assert main(["pretrain", "clipcl:test-tiny", "--out", str(out)]) == 2  # its own file: --overwrite needed
    assert "--overwrite" in error_line(capsys.readouterr().err)
    assert main(["pretrain", "clipcl:test-tiny", "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert json.loads((tmp_path / "w.json").read_text()) == record
    assert main(["pretrain", "clipcl:test-tiny", "--out", str(tmp_path / "other.pt"), "optim.lr=1"]) == 2
    assert "is fixed" in error_line(capsys.readouterr().err)


def test_a_stop_signal_during_pretraining_writes_nothing_and_removes_its_folder(tmp_path, monkeypatch):
    import os
    import signal

    from clipcl.engine import Trainer
    from clipcl.errors import stop_signals

    root = write_shapes(tmp_path / "shapes", flat=True, counts={n: 4 for n in SHAPES})
    real_step, calls = Trainer.train_step, []

    def step_then_signal(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    before = {s: signal.getsignal(s) for s in stop_signals()}
    out = tmp_path / "weights.pt"
    code, err = cli(["pretrain", str(root), "--out", str(out), *FAST, "optim.batch_size=2"])
    assert code == 128 + signal.SIGINT and len(calls) == 2
    lines = [line for line in err.splitlines() if line.startswith("clipcl: interrupted")]
    assert len(lines) == 1 and f"while pretraining on '{root}'; nothing was written to '{out}'" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no weights, record or training folder
    assert {s: signal.getsignal(s) for s in stop_signals()} == before
