"""Result files: results.json, accuracy_matrix.csv, plots, and comparison tables across runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write


def write_results_json(results: dict, out_dir: Path) -> None:
    """results.json, written atomically (a reader never sees half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1)
    atomic_write(out_dir / "results.json", lambda f: f.write(text.encode()))


def write_outputs(results: dict, out_dir: Path) -> None:
    """results.json, accuracy_matrix.csv and the plots of one run."""
    write_results_json(results, out_dir)
    R = results["accuracy_matrix"]
    lines = ["after_task," + ",".join(f"task{j}" for j in range(len(R[0]) if R else 0))]
    lines += [f"{t}," + ",".join("" if v is None else f"{v:.4f}" for v in row) for t, row in enumerate(R)]
    (out_dir / "accuracy_matrix.csv").write_text("\n".join(lines) + "\n")
    plot_run(results, out_dir)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(results: dict, out_dir: Path) -> None:
    """accuracy.png (accuracy on seen data after each task), accuracy_matrix.png, class_weights.png (gdro)."""
    plt = _plt()
    R = results["accuracy_matrix"]
    name = results["config"]["method"]["name"]
    if R:
        plot_comparison({name: results}, out_dir / "accuracy.png")
        M = np.array([[np.nan if v is None else 100 * v for v in row] for row in R], dtype=float)
        fig, ax = plt.subplots(figsize=(1 + 0.6 * M.shape[1], 1 + 0.5 * M.shape[0]))
        im = ax.imshow(M, vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(M):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
        ax.set_xlabel("test task j")
        ax.set_ylabel("after task t")
        ax.set_title(f"R[t, j] (%) - {name}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out_dir / "accuracy_matrix.png", dpi=100)
        plt.close(fig)
    if results.get("class_weights"):
        plot_class_weights(results, out_dir / "class_weights.png")


def plot_class_weights(results: dict, path: Path) -> None:
    """DRO class weights p_c over training steps, one line per class, tasks end to end."""
    plt = _plt()
    rows = results["class_weights"]
    names = results["scenario"]["classnames"]
    n = max(len(r["weights"]) for r in rows)
    W = np.array([r["weights"] + [np.nan] * (n - len(r["weights"])) for r in rows], dtype=float)
    W[W == 0] = np.nan  # a class not visited yet in its stage has no weight to draw
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    for c in range(n):
        ax.plot(x, W[:, c], lw=1, label=names[c] if c < len(names) else str(c))
    starts = [i for i in range(1, len(rows)) if rows[i]["task"] != rows[i - 1]["task"]]
    for s in starts:
        ax.axvline(s, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("recorded training step (tasks end to end)")
    ax.set_ylabel("class weight p_c")
    ax.set_title("DRO class weights")
    if n <= 20:
        ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(runs: dict[str, dict]) -> str:
    """A Markdown table comparing runs (name -> results dict)."""
    head = ("| method | avg inc. acc. | last acc. | forgetting | BWT | min diag | memory (img / KiB) "
            "| train img/s | train s |")
    lines = [head, "|" + "---|" * 9]
    for name, r in runs.items():
        m, R = r["metrics"], r["accuracy_matrix"]
        diag = min(R[t][t] for t in range(len(R)))
        lines.append(f"| {name} | {100 * m['avg_incremental_accuracy']:.1f} | {100 * m['last_accuracy']:.1f} | "
                     f"{100 * m['forgetting']:.1f} | {100 * m['backward_transfer']:.1f} | {100 * diag:.1f} | "
                     f"{r['memory']['images']} / {r['memory']['bytes'] / 1024:.0f} | "
                     f"{r['timing']['train_images_per_second'] or 0:.0f} | {r['timing']['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_comparison(runs: dict[str, dict], path: Path) -> None:
    """Accuracy on seen data after each task, one line per run."""
    from .evaluate import seen_accuracy

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        R, sizes = r["accuracy_matrix"], r["scenario"]["test_sizes"]
        ax.plot(range(1, len(R) + 1), [100 * seen_accuracy(R, sizes, t) for t in range(len(R))], marker="o", label=name)
    ax.set_xticks(range(1, 1 + max((len(r["accuracy_matrix"]) for r in runs.values()), default=0)))
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy on seen test data (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_results(path: Path) -> dict:
    """Read a results.json."""
    return json.loads(Path(path).read_text())
