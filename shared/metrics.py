"""Run metrics: one JSONL file, TensorBoard events, optionally Weights & Biases
(shared/wandb_sink.py), and a loss-curve PNG at the end."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    """Writes `{"step", "split", ...}` records to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True, wandb: str = "",
                 config: dict | None = None):
        """`wandb`: a W&B project to log to as well ("" = none), with `config` as the run's config."""
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
        self._wandb = None
        if wandb:
            from .wandb_sink import WandbSink

            self._wandb = WandbSink(wandb, Path(run_dir), config, resuming=resume_step is not None)

    def log(self, step: int, split: str, **values: float) -> None:
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log(step, split, {k: v for k, v in record.items() if k not in ("step", "split")})

    def add_text(self, tag: str, text: str, step: int) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)
        if self._wandb is not None:
            self._wandb.add_text(tag, text, step)

    def add_image(self, tag: str, image_chw, step: int) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image_chw, step)
        if self._wandb is not None:
            self._wandb.add_image(tag, image_chw, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out_png: Path, x_key: str = "step", x_label: str = "step") -> None:
    """Training loss and evaluation loss against `x_key`, and beside them the evaluation's
    accuracies when it reports any (`accuracy`, `zero_shot_accuracy`, ...), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    evals = [r for r in records if r["split"] == "eval" and x_key in r]
    accuracies = sorted({k for r in evals for k, v in r.items() if k.endswith("accuracy") and isinstance(v, (int, float))})
    fig, axes = plt.subplots(1, 2 if accuracies else 1, figsize=(12 if accuracies else 7, 4.2), dpi=120, squeeze=False)
    ax = axes[0, 0]
    for split, style in (("train", dict(lw=1.0, alpha=0.8)), ("eval", dict(marker="o", lw=1.5))):
        pts = [(r[x_key], r["loss"]) for r in records if r["split"] == split and "loss" in r and x_key in r]
        if pts:
            xs, ys = zip(*pts)
            label = "validation loss" if split == "eval" else "training loss"
            ax.plot(xs, ys, label=label, **style)
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(Path(metrics_path).parent.name)
    if accuracies:
        acc_ax = axes[0, 1]
        for key in accuracies:
            pts = [(r[x_key], r[key]) for r in evals if key in r]
            xs, ys = zip(*pts)
            acc_ax.plot(xs, ys, marker="o", lw=1.5, label=key.replace("_", " "))
        acc_ax.set_xlabel(x_label)
        acc_ax.set_ylabel("validation accuracy")
        acc_ax.grid(alpha=0.3)
        acc_ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
