"""Per-epoch feedback on rank 0: a CSV of metrics, a PNG of the curves, TensorBoard when installed."""
from __future__ import annotations

import csv
import logging
import os
from typing import Dict, List

_logger = logging.getLogger("overlock")

COLUMNS = ["epoch", "step", "lr", "train_loss", "train_loss_aux", "val_loss", "val_top1", "val_top5",
           "ema_val_loss", "ema_val_top1", "ema_val_top5", "epoch_time_s", "train_img_per_s", "bad_images"]  # bad_images: unreadable images met in that epoch


class Logbook:
    """Appends one row per epoch to ``metrics.csv`` and redraws ``curves.png``; rows past a resume point are
    dropped first, so a resumed run's log has each epoch once."""

    def __init__(self, output: str, resume_epoch: int = 0, tensorboard: bool = True):
        self.csv_path = os.path.join(output, "metrics.csv")
        self.png_path = os.path.join(output, "curves.png")
        self.rows: List[Dict[str, str]] = []
        self._warned = False
        if os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < resume_epoch]
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
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.csv_path)

    def append(self, row: Dict[str, float]) -> None:
        clean = {k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k])))
                 for k in COLUMNS}
        self.rows.append(clean)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow(clean)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()
        self.plot()

    def plot(self) -> None:
        try:
            plot_curves(self.rows, self.png_path)
        except ImportError:
            if not self._warned:
                _logger.warning("matplotlib is not installed, so no curves.png is drawn (metrics.csv has the same "
                                "numbers): pip install 'overlock[train]' or pip install matplotlib")
                self._warned = True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _series(rows, key):
    xs, ys = [], []
    for r in rows:
        if r.get(key) not in ("", None):
            xs.append(int(r["epoch"]) + 1)
            ys.append(float(r[key]))
    return xs, ys


def plot_curves(rows: List[Dict[str, str]], path: str) -> None:
    """Loss, top-1/top-5 and learning rate against epoch, written atomically to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("loss", (("train_loss", "train"), ("train_loss_aux", "train (aux head)"), ("val_loss", "val"),
                  ("ema_val_loss", "val (EMA)"))),
        ("validation accuracy (%)", (("val_top1", "top-1"), ("val_top5", "top-5"), ("ema_val_top1", "top-1 (EMA)"),
                                     ("ema_val_top5", "top-5 (EMA)"))),
        ("learning rate", (("lr", None),)),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, label=label)
        ax.set_title(title)
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
