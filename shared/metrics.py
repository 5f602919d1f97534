"""Run metrics: one JSONL file, TensorBoard events, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    """Writes `{"step", "split", ...}` records to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # drop what an interrupted run logged after the checkpoint we resume from
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by the interruption
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir), purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, step: int, split: str, **values: float) -> None:
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def add_image(self, tag: str, image_chw, step: int) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image_chw, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out_png: Path, x_key: str = "step", x_label: str = "step") -> None:
    """Training loss (and evaluation loss when logged) against `x_key`, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for split, style in (("train", dict(lw=1.0, alpha=0.8)), ("eval", dict(marker="o", lw=1.5))):
        pts = [(r[x_key], r["loss"]) for r in records if r["split"] == split and "loss" in r and x_key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=f"{split} loss", **style)
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(Path(metrics_path).parent.name)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
