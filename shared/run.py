"""What every training script does around the trainer: arguments, the run folder, the resolved
config, resume, and the closing report."""

from __future__ import annotations

import argparse
import atexit
import fcntl
import json
import math
import os
import shutil
from pathlib import Path
from typing import TypeVar

from . import distributed
from .checkpoint import LATEST, resolve_checkpoint
from .config import apply_overrides, dump_toml, from_dict, load_toml, to_dict
from .errors import UserError

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
LOCK = ".lock"
_held_locks: list = []  # open lock files: held until the process exits


def lock_run_dir(run_dir: Path) -> None:
    """Hold an exclusive lock on the run folder for this process's life: a second process with the
    same experiment name is refused in one line instead of interleaving configs and checkpoints.
    A folder that holds nothing but the lock when the process ends (a refused run) is removed."""
    fresh = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK, "a+")
    except OSError as e:
        raise UserError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{run_dir} is in use by another process (pid {owner}): wait for it to finish or choose "
                        "another --experiment_name") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held_locks.append(f)

    def release() -> None:
        if fresh and [p.name for p in run_dir.iterdir()] == [LOCK]:
            shutil.rmtree(run_dir, ignore_errors=True)

    atexit.register(release)


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or infinite."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def check_writable(folder: Path, what: str) -> None:
    """Create `folder` and write a probe file in it, or fail in one line before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {folder} is not writable: {e.strerror or e}") from None


def check_output(path: str | Path | None, folder: bool) -> Path | None:
    """Refuse, before any work, an output that could not be written: a file where a folder is
    expected or the reverse, or a parent that is a file or read-only."""
    if path is None:
        return None
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; give a folder for the output")
    if not folder and path.is_dir():
        raise UserError(f"{path} is a folder; give a file name for the output")
    existing = path if folder else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{existing} is a file, so {path} cannot be created")
    if not os.access(existing, os.W_OK):
        raise UserError(f"cannot write under {existing}")
    return path


def find_preset(config: str, package: str | None, flag: str = "--config") -> str:
    """`--config debug` means configs/<package>/debug.toml; a path is taken as it is."""
    path = Path(config)
    if path.exists() or package is None or "/" in config or config.endswith(".toml"):
        return config
    preset = ROOT / "configs" / package / f"{config}.toml"
    if preset.is_file():
        return str(preset)
    names = ", ".join(sorted(p.stem for p in (ROOT / "configs" / package).glob("*.toml")))
    raise UserError(f"{flag} {config!r} is neither a file nor a {package} preset ({names})")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="preset TOML (configs/...); default: the run's saved config when resuming")
    p.add_argument("--experiment_name", help="run folder runs/<name>; default: the config's file name")
    p.add_argument("--data", help="data spec (overrides data.source)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue runs/<name> from its latest checkpoint, or from the checkpoint folder given")
    p.add_argument("--runs_dir", default="runs", help="parent folder of run folders")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.batch_size=8")


def resolve_run(args: argparse.Namespace, cls: type[T], extra: dict[str, object],
                package: str | None = None) -> tuple[T, Path, Path | None]:
    """(config, run folder, checkpoint to resume from or None), with the run folder locked for this
    process. `extra` maps dotted keys to values from dedicated flags (None = not given); they apply
    after the config file, before overrides. `package` names the preset folder for `--config NAME`."""
    if not args.experiment_name and not args.config:
        raise UserError("give --config (a preset TOML) or --experiment_name of a run to resume")
    if args.config:
        args.config = find_preset(args.config, package)
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
    if distributed.setup().main:  # under torchrun rank 0 holds the lock for the whole run
        lock_run_dir(run_dir)
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
    if summary["compile_warmup_s"]:
        time_line += f" (+{summary['compile_warmup_s']:.1f} s {'compile ' if summary['compile'] else ''}warm-up)"
    rate = summary[f"{unit}_per_s"]
    lines = lines + [("training time", time_line), (f"{unit}/s", f"{rate:,.0f}" if rate else "n/a"),
                     (f"{unit} seen", f"{summary[unit]:,}"), ("summary", str(run_dir / "summary.json"))]
    width = max(len(label) for label, _ in lines) + 2
    for label, value in lines:
        print(f"{label:<{width}}{value}")


def describe_training(trainer, run_dir: Path, resume: Path | None, extra: str = "") -> None:
    """One line before training starts: steps, device, precision, run folder."""
    cfg = trainer.cfg
    if trainer.dist.active:
        extra += (f", {trainer.dist.world} process{'es' if trainer.dist.world > 1 else ''} ({'FSDP' if trainer.sharded else 'DDP'}, "
                  f"{len(trainer.accum.micro_batches)} micro-batches of "
                  f"{trainer.cfg.batch_size // (1 if trainer.accum.rows is None else trainer.dist.world)} per process per step)")
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
