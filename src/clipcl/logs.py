"""The per-step log of a run: log.csv in the run folder always, TensorBoard and Weights & Biases when asked.

log.csv has one row every log.every training steps: the global step (tasks end to end), the task (from 1),
the step within it, the logged loss, every term the method returned, the learning rate and the step's
images/s. A resumed run first drops the rows written after its checkpoint (they are trained again), so the
log of an interrupted and resumed run holds the rows of an uninterrupted one. Only rank 0 logs.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .config import ConfigError, LogCfg
from . import owned
from .files import write_text
from .rundir import TENSORBOARD_DIR

LOG_NAME = "log.csv"
FIXED = ("step", "task", "task_step", "loss", "lr", "images_per_second")


def _check_installed(cfg: LogCfg) -> None:
    """A logger asked for but not installed is a ConfigError before anything runs."""
    from importlib.util import find_spec

    for key, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if getattr(cfg, key) and find_spec(package) is None:
            raise ConfigError(f"config key 'log.{key}' = true, but the {package} package is not installed: "
                              f"pip install {package} (or set log.{key}=false).")


def _format(v: object) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


class StepLog:
    """Writes the rows of a run's per-step log to every sink the config asks for."""

    def __init__(self, cfg: LogCfg, out_dir: Path, run_config: dict, name: str, enabled: bool = True):
        self.cfg, self.out_dir, self.enabled = cfg, Path(out_dir), enabled
        self.run_config, self.name = run_config, name
        self.columns: list[str] = list(FIXED)
        self._file: io.TextIOBase | None = None
        self._tb = None
        self._wandb = None
        if enabled:
            _check_installed(cfg)

    # ---------------------------------------------------------------- opening
    def open(self, resume_at: int | None, run_id: str) -> None:
        """Start logging: a fresh log.csv, or (resume_at = the checkpoint's global step) the rows before it.
        run_id names the run for W&B: drawn when the run starts and kept in its checkpoint."""
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rows = self._read(before=resume_at) if resume_at is not None else []
        self._rewrite(rows)
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # listed in the run's marker first; a link planted in the folder's place is refused, never followed
            owned.add_files(self.out_dir, [f"{TENSORBOARD_DIR}/", f"{TENSORBOARD_DIR}/events.out.tfevents.*"])
            events = owned.real_dir(self.out_dir / TENSORBOARD_DIR, "TensorBoard events")
            # purge_step: events at or after the checkpoint, from the interrupted attempt, are dropped
            self._tb = SummaryWriter(str(events), purge_step=resume_at)
        if self.cfg.wandb:
            import wandb

            if (self.out_dir / "wandb").is_symlink():
                owned.real_dir(self.out_dir / "wandb", "Weights & Biases files")  # refuses the link
            owned.add_files(self.out_dir, ["wandb/"])
            self._wandb = wandb.init(project=self.cfg.wandb_project, name=self.name, id=run_id, resume="allow",
                                     config=self.run_config, dir=str(self.out_dir))

    def _read(self, before: int | None = None) -> list[dict[str, str]]:
        """The rows of log.csv (those of steps < before), setting the columns from its header; a line cut by
        a crash ends them."""
        path = self.out_dir / LOG_NAME
        rows: list[dict[str, str]] = []
        if not path.is_file():
            return rows
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            self.columns = list(reader.fieldnames or FIXED)
            for row in reader:
                if None in row.values() or None in row:
                    break
                try:
                    if before is not None and int(row["step"]) >= before:
                        break
                except (KeyError, ValueError):
                    break
                rows.append(row)
        return rows

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        """log.csv with the current columns and these rows, written atomically (a crash keeps the old file),
        then opened to append to row by row."""
        if self._file is not None:
            self._file.close()
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.out_dir / LOG_NAME, text.getvalue())
        self._file = open(self.out_dir / LOG_NAME, "a", newline="", encoding="utf-8")

    # ---------------------------------------------------------------- writing
    def step(self, step: int, task: int, task_step: int, values: dict[str, float], lr: float,
             images_per_second: float) -> None:
        """One training step's row."""
        if not self.enabled or self._file is None:
            return
        row = {"step": step, "task": task + 1, "task_step": task_step, "loss": values.get("loss", float("nan")),
               "lr": lr, "images_per_second": images_per_second,
               **{k: v for k, v in values.items() if k != "loss"}}
        text = {k: _format(v) for k, v in row.items()}
        new = [k for k in text if k not in self.columns]
        if new:  # a term that appears later (a teacher's, from task 2 on): the header grows, earlier rows stay
            self._file.close()
            self._file = None
            rows = self._read()
            self.columns += sorted(new)
            self._rewrite(rows)
        csv.DictWriter(self._file, fieldnames=self.columns, restval="").writerow(text)
        self._file.flush()
        scalars = {k: float(v) for k, v in row.items() if k not in ("step", "task", "task_step")}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def task_end(self, step: int, task: int, seen_accuracy: float) -> None:
        """The accuracy on seen classes after task `task`, at `step`, the task's last training step (a resume
        from the task's end purges later steps only, so the point survives)."""
        if self._tb is not None:
            self._tb.add_scalar("eval/seen_accuracy", 100 * seen_accuracy, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({"eval/seen_accuracy": 100 * seen_accuracy, "eval/task": task + 1}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
