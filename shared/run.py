"""What every training script does around the trainer: arguments, the run folder, the resolved
config, resume, and the closing report."""

from __future__ import annotations

import argparse
import atexit
import copy
import fcntl
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, TypeVar

from . import distributed
from .checkpoint import LATEST, load_state, resolve_checkpoint, write_file_atomic
from .config import apply_overrides, dump_toml, from_dict, load_toml, renamed, to_dict
from .cpuload import shared_note
from .errors import ConfigError, UserError

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
LOCK = ".lock"
CHANGES = "config_changes.jsonl"  # settings changed on resume: {step, key, before, after} per line

# A run's kind as its config.toml shows it (old runs record nothing else): a key that only that
# package's config has, looked for in this order. Names only: shared imports no package.
RUN_KINDS = {"multimodal": ("data.vqvae", "multimodal"), "vqvae": ("gan", "VQ-VAE"),
             "flow_matching": ("flow", "flow-matching"), "classifier": ("label_smoothing", "classifier"),
             "llm": ("data.seq_len", "text LLM")}

# On resume, what shapes the weights or the data is kept: every model.* and data.* key, and these.
RESUME_FIXED = {
    "model": "the checkpoint does not fit this model (a resumed run keeps its architecture)",
    "data": "a resumed run keeps its sequence layout and data",
    "train.batch_size": "a resumed run keeps its batches (the data position counts them)",
    "train.grad_accum": "a resumed run keeps its batches (the data position counts them)",
    "train.seed": "a resumed run keeps its seed (the data order and the noise follow it)",
    "train.ema_decay": "a resumed run keeps its EMA (the checkpoint's averaged weights follow it)",
}
RESUME_FREE = ("data.cache_dir", "data.eval_images", "data.zero_shot_images")  # where, and what is evaluated
# filled in by the scripts when left 0 or "" (from the tokenizer, the data, the budget; --vqvae): a
# preset's 0 is no request to change the value the run was given
DERIVED = ("model.vocab_size", "model.num_classes", "data.max_tokens", "data.vqvae")
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
        if fresh and run_dir.is_dir() and [p.name for p in run_dir.iterdir()] == [LOCK]:  # it may have been deleted
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
    p.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project (train.wandb)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.batch_size=8")


def check_experiment_name(name: str | None) -> None:
    """A run name, not a path: runs/<name> must stay inside --runs_dir."""
    if name is None:
        return
    if not name.strip():
        raise UserError("--experiment_name is empty: give the run a name (its folder is <runs_dir>/<name>)")
    if name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
        raise UserError(f"--experiment_name {name!r} is a path, not a name: give a plain name "
                        "(choose where run folders go with --runs_dir)")


def resolve_run(args: argparse.Namespace, cls: type[T], extra: dict[str, object],
                package: str | None = None, fixed: tuple[str, ...] = (),
                free: tuple[str, ...] = ()) -> tuple[T, Path, Path | None]:
    """(config, run folder, checkpoint to resume from or None), with the run folder locked for this
    process. `extra` maps dotted keys to values from dedicated flags (None = not given); they apply
    after the config file, before overrides. `package` names the preset folder for `--config NAME`
    and the kind of run a resume must find.

    On --resume the run's saved config.toml is the base (resumed_config): `fixed` adds keys that
    shape the weights to RESUME_FIXED, `free` exempts keys from it."""
    check_experiment_name(args.experiment_name)
    if args.experiment_name is None and not args.config:
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
    extra = {**extra, "train.wandb": getattr(args, "wandb", None)}
    given = [f"{k}={json.dumps(v)}" for k, v in extra.items() if v is not None] + list(args.overrides)
    saved = _saved_config(run_dir, resume)
    if saved is not None:
        cfg = resumed_config(cls, saved, args.config, given, package, fixed, free)
    elif args.config:
        if resume is not None:
            print(f"note: {run_dir} has no config.toml: resuming with {args.config} as given")
        cfg = from_dict(cls, apply_overrides(renamed(cls, load_toml(args.config)), given))
    else:
        raise UserError(f"no --config given and {run_dir / 'config.toml'} not found")
    if distributed.setup().main:  # under torchrun rank 0 holds the lock for the whole run
        lock_run_dir(run_dir)
    return cfg, run_dir, resume


def _saved_config(run_dir: Path, resume: Path | None) -> Path | None:
    """The config a resume continues: the run's own, or that of the run the checkpoint came from."""
    if resume is None:
        return None
    for folder in (run_dir, *Path(resume).resolve().parents):
        if (folder / "config.toml").is_file():
            return folder / "config.toml"
    return None


def resumed_config(cls: type[T], saved_path: Path, preset: str | None, given: list[str], package: str | None = None,
                   fixed: tuple[str, ...] = (), free: tuple[str, ...] = ()) -> T:
    """The saved config with what the command line changes. A changed key that shapes the weights or
    the data (RESUME_FIXED, `fixed`; not `free`) is refused in one line. Another setting changes only
    when given on the command line (`given`: flags and section.key=value); where only the preset
    (`--config`) differs, the run's value is kept and a note says so. save_config records the changes."""
    run_dir = saved_path.parent
    raw = load_toml(saved_path)
    _check_kind(raw, run_dir, package)
    try:
        base = to_dict(from_dict(cls, copy.deepcopy(raw)))  # types normalised, settings added since filled in
    except ConfigError as e:
        raise ConfigError(f"{saved_path} does not load: {e}") from None
    preset_data = renamed(cls, load_toml(preset)) if preset else {}
    requested = flatten(to_dict(from_dict(cls, apply_overrides(_merge(copy.deepcopy(base), preset_data), list(given)))))
    before, explicit = flatten(base), flatten(renamed(cls, apply_overrides({}, list(given))))
    changed, ignored = [], []
    for key in sorted(set(flatten(preset_data)) | set(explicit)):
        old, new = before.get(key), requested.get(key)
        if same_setting(old, new) or (key in DERIVED and not new):
            continue
        reason = _fixed_reason(key, fixed, free)
        if reason:
            raise ConfigError(f"{key} = {_show(new)} but {run_dir} was trained with {_show(old)}: {reason}; "
                              "start a new run (another --experiment_name) to change it")
        (changed if key in explicit else ignored).append(f"{key} {_show(old)} -> {_show(new)}")
    if ignored:
        print(f"note: resuming {run_dir} with its saved settings; {preset} differs in "
              f"{', '.join(ignored)}, not applied (give section.key=value to change a setting)")
    if changed:
        print(f"resuming {run_dir} with changed settings: {', '.join(changed)} (recorded in {run_dir / CHANGES})")
    return from_dict(cls, apply_overrides(copy.deepcopy(base), list(given)))


def _fixed_reason(key: str, fixed: tuple[str, ...], free: tuple[str, ...]) -> str | None:
    if key in free or key in RESUME_FREE:
        return None
    if key in fixed:
        return "a resumed run keeps what shapes its weights"
    return RESUME_FIXED.get(key) or RESUME_FIXED.get(key.split(".")[0] if "." in key else "")


def _check_kind(raw: dict, run_dir: Path, package: str | None) -> None:
    other = run_kind(raw)
    if package in RUN_KINDS and other is not None and other != package:
        raise UserError(f"{run_dir} is not a {RUN_KINDS[package][1]} run (it is a {RUN_KINDS[other][1]} run)")


def run_kind(data: dict) -> str | None:
    """The package whose run wrote this config (RUN_KINDS), or None."""
    keys = set(flatten(data)) | set(data)
    return next((package for package, (key, _) in RUN_KINDS.items() if key in keys), None)


def load_run_config(run_dir: Path, cls: type[T], package: str) -> T:
    """A run folder's config.toml as `cls`; another package's run is named as such in one line."""
    raw = load_toml(Path(run_dir) / "config.toml")
    _check_kind(raw, Path(run_dir), package)
    try:
        return from_dict(cls, raw)
    except ConfigError as e:
        raise ConfigError(f"{Path(run_dir) / 'config.toml'} is not a {RUN_KINDS[package][1]} run config: {e}") from None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; tuples as lists, as TOML reads them back."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _merge(base: dict, top: dict) -> dict:
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def same_setting(a: Any, b: Any) -> bool:
    """Equal values, or two spellings of one existing path (runs/vq and /abs/runs/vq)."""
    a, b = (list(x) if isinstance(x, tuple) else x for x in (a, b))
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    try:
        return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):  # a string that cannot be a path
        return False


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (str, list)) else str(v)


def checkpoint_step(ckpt: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", Path(ckpt).name)
    return int(m.group(1)) if m else int(load_state(ckpt)["step"])


def save_config(cfg: object, run_dir: Path, resume: Path | None = None) -> None:
    """Write the resolved config.toml. On a resume every setting that differs from the saved one is
    appended to config_changes.jsonl first ({step it applies from, key, before, after}), so the two
    files always hold everything the run was trained with; a new run starts that file afresh."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path, log = run_dir / "config.toml", run_dir / CHANGES
    data = to_dict(cfg)
    if resume is None:
        log.unlink(missing_ok=True)
    elif path.is_file():
        before, after = flatten(_today(type(cfg), load_toml(path))), flatten(data)
        step = checkpoint_step(resume)
        lines = [json.dumps({"step": step, "key": k, "before": before.get(k), "after": after.get(k)})
                 for k in sorted(set(before) | set(after)) if not same_setting(before.get(k), after.get(k))]
        if lines:
            kept = log.read_text() if log.is_file() else ""
            write_file_atomic(log, lambda p: p.write_text(kept + "".join(line + "\n" for line in lines)), "the config changes")
    write_file_atomic(path, lambda p: p.write_text(dump_toml(data)), "the run config")


def _today(cls: type, saved: dict) -> dict:
    """A saved config as this code names its keys: a file that used old names (a config class's RENAMED)
    is read as it loads, so a renamed key is no change."""
    return to_dict(from_dict(cls, saved)) if renamed(cls, saved) != saved else saved


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
    if note := shared_note(summary.get("cpu_others")):
        time_line += f" ({note}: a shared machine's speed)"
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
          f"({str(trainer.dtype).removeprefix('torch.')}{', compiled' if cfg.compile else ''}"
          f"{', freed memory kept' if trainer.kept_memory else ''}){extra}, "
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
