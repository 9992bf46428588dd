"""Feedback on rank 0, one row per epoch (or evaluation interval): ``metrics.csv``, ``curves.png``, TensorBoard.

One class serves every trainer; a task passes its columns, its plot panels and the column that counts steps.
Rows past a resume point are dropped first, so a resumed run's log lists each epoch/interval once.
"""
from __future__ import annotations

import csv
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

_logger = logging.getLogger("overlock")

# a plot panel: a title and its series, each (column, legend label or None)
Panel = Tuple[str, Sequence[Tuple[str, Optional[str]]]]

# classification; bad_images: unreadable-image reads in that epoch (not a running total)
COLUMNS = ["epoch", "step", "lr", "train_loss", "train_loss_aux", "val_loss", "val_top1", "val_top5",
           "ema_val_loss", "ema_val_top1", "ema_val_top5", "epoch_time_s", "train_img_per_s", "bad_images"]
PANELS: List[Panel] = [
    ("loss", [("train_loss", "train"), ("train_loss_aux", "train (aux head)"), ("val_loss", "val"),
              ("ema_val_loss", "val (EMA)")]),
    ("validation accuracy (%)", [("val_top1", "top-1"), ("val_top5", "top-5"), ("ema_val_top1", "top-1 (EMA)"),
                                 ("ema_val_top5", "top-5 (EMA)")]),
    ("learning rate", [("lr", None)]),
]


class Logbook:
    """Appends a row to ``metrics.csv`` and redraws ``curves.png`` against ``x_key`` (``epoch`` is drawn counted
    from 1). On start, rows whose ``step_key`` lies past ``resume_step`` (logged after the checkpoint a run
    resumes from) are dropped."""

    def __init__(self, output: str, resume_step: int = 0, columns: Sequence[str] = COLUMNS,
                 panels: Sequence[Panel] = PANELS, x_key: str = "epoch", step_key: str = "step",
                 tensorboard: bool = True):
        self.csv_path = os.path.join(output, "metrics.csv")
        self.png_path = os.path.join(output, "curves.png")
        self.columns, self.panels, self.x_key = list(columns), panels, x_key
        self.rows: List[Dict[str, str]] = []
        self._warned = False
        if os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r[step_key]) <= resume_step]
        self._rewrite()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(output, "tensorboard"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional
                self.writer = None

    def _rewrite(self) -> None:
        tmp = self.csv_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.csv_path)

    def append(self, row: Dict[str, float]) -> None:
        clean = {k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k])))
                 for k in self.columns}
        self.rows.append(clean)
        self._rewrite()
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row[self.x_key])
            self.writer.flush()
        self.plot()

    def plot(self) -> None:
        try:
            plot_curves(self.rows, self.png_path, self.panels, self.x_key)
        except ImportError:
            if not self._warned:
                _logger.warning("matplotlib is not installed, so no curves.png is drawn (metrics.csv has the same "
                                "numbers): pip install 'overlock[train]' or pip install matplotlib")
                self._warned = True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _series(rows, key: str, x_key: str):
    first = 1 if x_key == "epoch" else 0  # epochs are counted from 1 on the plot
    xs, ys = [], []
    for r in rows:
        if r.get(key) not in ("", None):
            xs.append(int(r[x_key]) + first)
            ys.append(float(r[key]))
    return xs, ys


def plot_curves(rows: List[Dict[str, str]], path: str, panels: Sequence[Panel] = PANELS,
                x_key: str = "epoch") -> None:
    """One subplot per panel against ``x_key``, written atomically to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for key, label in series:
            xs, ys = _series(rows, key, x_key)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel(x_key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
