"""Pictures of speedrun records: validation loss against tokens for every run (mean and band across
seeds) and the final losses side by side, with the Welch verdict in the title when two records
are compared."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from shared.errors import UserError

from .speedrun import format_budget, verdict

COLOURS = ("#1f77b4", "#d62728")  # baseline, candidate


def _eval_band(record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(tokens, mean, sd) of the validation loss at the evaluation points every run shares."""
    curves = [dict((int(x), y) for x, y in c["eval"]) for c in record.get("curves", []) if c.get("eval")]
    if not curves:
        return None
    xs = sorted(set.intersection(*(set(c) for c in curves)))
    if not xs:
        return None
    ys = np.array([[c[x] for x in xs] for c in curves])
    sd = ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(len(xs))
    return np.array(xs), ys.mean(0), sd


def _save(fig, out_png: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        fig.savefig(out_png)
    except OSError as e:
        raise UserError(f"cannot write {out_png}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return Path(out_png)


def plot_records(records: list[tuple[str, dict]], out_png: Path, comparison: dict | None = None,
                 title: str | None = None) -> Path:
    """One PNG of one record or of a baseline and a candidate ((name, record) pairs, baseline first):
    left, every run's validation curve thin (its training curve dashed) with the mean ± sd across seeds; right, each record's
    final losses (one dot a run) with its mean. `comparison` (llm.speedrun.compare) puts the
    loss verdict in the title; else `title` (a screen's) is there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curve_ax, final_ax) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=120, gridspec_kw={"width_ratios": [2, 1]})
    presets = list(dict.fromkeys(rec["preset"] for _, rec in records))
    names = [f"{rec['preset']} {rec['label']}" if len(presets) > 1 else rec["label"] for _, rec in records]
    for i, (name, rec) in enumerate(records):
        colour, label = COLOURS[i % len(COLOURS)], f"{names[i]} (n={len(rec['runs'])})"
        for c in rec.get("curves", []):
            if c.get("train"):  # faint: a noisier estimate, but dense where evaluations are few
                x, y = zip(*c["train"])
                curve_ax.plot(x, y, color=colour, lw=0.5, alpha=0.25, ls="--")
            if c.get("eval"):
                x, y = zip(*c["eval"])
                curve_ax.plot(x, y, color=colour, lw=0.6, alpha=0.35)
        band = _eval_band(rec)
        if band is not None:
            x, mean, sd = band
            curve_ax.plot(x, mean, color=colour, lw=1.8, marker="o", ms=3, label=label)
            curve_ax.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.2, lw=0)
        losses = [r["loss"] for r in rec["runs"]]
        jitter = np.linspace(-0.08, 0.08, len(losses)) if len(losses) > 1 else [0.0]
        final_ax.scatter(np.full(len(losses), i) + jitter, losses, color=colour, s=22, zorder=3)
        final_ax.hlines(np.mean(losses), i - 0.2, i + 0.2, color=colour, lw=2)
    curve_ax.set_xlabel("training tokens")
    curve_ax.set_ylabel("loss (validation solid, training dashed)")
    curve_ax.grid(alpha=0.3)
    if curve_ax.get_legend_handles_labels()[0]:
        curve_ax.legend()
    first = records[0][1]
    curve_ax.set_title(f"{' vs '.join(presets)}, {format_budget(first['budget'])} tokens")
    final_ax.set_xticks(range(len(records)), [n.replace(" ", "\n") for n in names])  # two presets' names side by side
    final_ax.set_xlim(-0.6, len(records) - 0.4)
    final_ax.set_ylabel("final validation loss")
    final_ax.grid(alpha=0.3, axis="y")
    final_ax.set_title(verdict("loss", comparison["loss"], comparison["alpha"]) if comparison else title or "final losses",
                       fontsize=9)
    return _save(fig, out_png)


def _numbers(values: list[str]) -> list[float] | None:
    """The values as numbers for a numeric axis; None (drawn in order) when one is not a finite number."""
    try:
        nums = [float(v) for v in values]
    except ValueError:
        return None
    return nums if all(math.isfinite(x) for x in nums) else None


def plot_sweep(key: str, values: list[str], records: list[dict], out_png: Path,
               baseline: tuple[str, dict] | None = None) -> Path:
    """One PNG of a sweep: the final validation loss of every run (a dot a seed) against the swept
    value, the mean ± sd of each value joined by a line, and the baseline's mean ± sd as a band.
    Numeric values sit on a numeric axis (logarithmic when they span 10x or more), others in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nums = _numbers(values)
    xs = nums if nums is not None else list(range(len(values)))
    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=120)
    if nums is not None and min(nums) > 0 and max(nums) / min(nums) >= 10:
        ax.set_xscale("log")
    means, sds = [], []
    for x, rec in zip(xs, records):
        losses = [r["loss"] for r in rec["runs"]]
        ax.scatter([x] * len(losses), losses, color=COLOURS[1], s=16, alpha=0.6, zorder=3)
        means.append(float(np.mean(losses)))
        sds.append(float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0)
    ax.errorbar(xs, means, yerr=sds, color=COLOURS[1], lw=1.6, marker="o", ms=5, capsize=3, label="mean ± sd",
                ls="-" if nums is not None else "none")  # a line only where the values have an order
    if baseline is not None:
        losses = [r["loss"] for r in baseline[1]["runs"]]
        m, sd = float(np.mean(losses)), float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0
        ax.axhline(m, color=COLOURS[0], ls="--", lw=1.2, label=f"baseline {baseline[1]['label']} (n={len(losses)})")
        ax.axhspan(m - sd, m + sd, color=COLOURS[0], alpha=0.12, lw=0)
        # screens on fewer seeds than the baseline compare with its loss on those seeds, not its mean
        by_seed = {r["seed"]: r["loss"] for r in baseline[1]["runs"]}
        seed_sets = {tuple(sorted(r["seed"] for r in rec["runs"])) for rec in records}
        same = next(iter(seed_sets)) if len(seed_sets) == 1 else ()
        if same and len(same) < len(by_seed) and all(k in by_seed for k in same):
            ax.axhline(float(np.mean([by_seed[k] for k in same])), color=COLOURS[0], ls=":", lw=1.2,
                       label=f"baseline on the same seed{'s' if len(same) > 1 else ''} ({', '.join(map(str, same))})")
    if nums is None or len(values) <= 8:
        ax.set_xticks(xs, values, rotation=0 if nums is not None or len(values) <= 4 else 30,
                      ha="center" if nums is not None or len(values) <= 4 else "right")
    ax.set_xlabel(key)
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    first = records[0]
    counts = sorted({len(r["runs"]) for r in records})
    seeds = f"n={counts[0]} seeds each" if len(counts) == 1 else f"n={counts[0]}-{counts[-1]} seeds"
    ax.set_title(f"{first['preset']}, {format_budget(first['budget'])} tokens: {key} ({seeds})", fontsize=10)
    return _save(fig, out_png)
