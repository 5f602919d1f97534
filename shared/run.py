"""What every training script does around the trainer: arguments, the run folder, the resolved
config, resume, and the closing report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TypeVar

from .checkpoint import LATEST, resolve_checkpoint
from .config import apply_overrides, dump_toml, from_dict, load_toml, to_dict
from .errors import UserError

T = TypeVar("T")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="preset TOML (configs/...); default: the run's saved config when resuming")
    p.add_argument("--experiment_name", help="run folder runs/<name>; default: the config's file name")
    p.add_argument("--data", help="data spec (overrides data.source)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue runs/<name> from its latest checkpoint, or from the checkpoint folder given")
    p.add_argument("--runs_dir", default="runs", help="parent folder of run folders")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.batch_size=8")


def resolve_run(args: argparse.Namespace, cls: type[T], extra: dict[str, object]) -> tuple[T, Path, Path | None]:
    """(config, run folder, checkpoint to resume from or None). `extra` maps dotted keys to values
    from dedicated flags (None = not given); they apply after the config file, before overrides."""
    if not args.experiment_name and not args.config:
        raise UserError("give --config (a preset TOML) or --experiment_name of a run to resume")
    name = args.experiment_name or Path(args.config).stem
    run_dir = Path(args.runs_dir) / name
    resume = None
    if args.resume not in (None, "latest") and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)  # `--resume key=value`: the optional value was an override
        args.resume = "latest"
    if args.resume is not None:
        resume = resolve_checkpoint(run_dir if args.resume == "latest" else args.resume)
    elif (run_dir / "checkpoints" / LATEST).exists():
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --experiment_name")
    if args.config:
        data = load_toml(args.config)
    elif resume is not None and (run_dir / "config.toml").is_file():
        data = load_toml(run_dir / "config.toml")
    else:
        raise UserError(f"no --config given and {run_dir / 'config.toml'} not found")
    flags = [f"{k}={json.dumps(v)}" for k, v in extra.items() if v is not None]
    cfg = from_dict(cls, apply_overrides(data, flags + list(args.overrides)))
    return cfg, run_dir, resume


def save_config(cfg: object, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_toml(to_dict(cfg)))


def find_run_dir(path: str | Path) -> Path:
    """The run folder (the one holding config.toml) at or above a checkpoint path."""
    path = Path(path).resolve()
    for candidate in (path, *path.parents):
        if (candidate / "config.toml").is_file():
            return candidate
    raise UserError(f"no config.toml at or above {path}: is it a run folder or a checkpoint inside one?")


def report(summary: dict, run_dir: Path, lines: list[tuple[str, str]]) -> None:
    """Print the task's final numbers, then time, throughput and where the summary is."""
    unit = summary["unit"]
    time_line = f"{summary['train_time_s']:.1f} s"
    if summary["compile"]:
        time_line += f" (+{summary['compile_warmup_s']:.1f} s compile warm-up)"
    rate = summary[f"{unit}_per_s"]
    lines = lines + [("training time", time_line), (f"{unit}/s", f"{rate:,.0f}" if rate else "n/a"),
                     (f"{unit} seen", f"{summary[unit]:,}"), ("summary", str(run_dir / "summary.json"))]
    width = max(len(label) for label, _ in lines) + 2
    for label, value in lines:
        print(f"{label:<{width}}{value}")


def describe_training(trainer, run_dir: Path, resume: Path | None, extra: str = "") -> None:
    """One line before training starts: steps, device, precision, run folder."""
    cfg = trainer.cfg
    print(f"training: {trainer.total_steps:,} steps of {trainer.units_per_step:,} {trainer.task.unit} on {trainer.device} "
          f"({str(trainer.dtype).removeprefix('torch.')}{', compiled' if cfg.compile else ''}){extra}, "
          f"run folder {run_dir}" + (f", resuming from {resume}" if resume else ""), flush=True)


def print_results(result: dict, output: str | None) -> None:
    """An evaluation's results as aligned lines, and as JSON at `output` when given."""
    width = max(len(k) for k in result) + 2
    for k, v in result.items():
        print(f"{k:<{width}}{v}")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {output}")
