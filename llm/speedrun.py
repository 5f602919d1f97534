"""Speedrun records: several seeded runs of one preset at one token budget, summarised as mean and
spread; a comparison with a recorded baseline by Welch's one-sided t-test (the GPT-2 speedrun's
rule: a change counts when it is better at p < 0.01); and a leaderboard generated from the records.

A record is one JSON file; everything shown (summary, leaderboard) is recomputed from its per-run
figures, so a record cannot disagree with itself. A record names its data, split, tokenizer and
hardware, and holds no absolute path of the machine it ran on: a path in the workspace is written
relative to the checkout (../<folder>/text), any other by the sha256 of its content.

Two records compare when they trained the same number of tokens on the same data (the same
resolved [data] table, llm.config.data_keys), whatever their presets: Blueberry's recipe against
5-dollar-llm's on their benchmark is `--preset blueberry-88m --data_from 5dollar-88m --compare`
a 5dollar-88m record. 5-dollar-llm's published records are shown beside the leaderboard as a
reference table (PUBLISHED), never ranked with measured rows."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Iterator, Sequence

from shared.checkpoint import write_file_atomic
from shared.config import apply_overrides, from_dict, load_toml, renamed
from shared.cpuload import shared_note
from shared.cpumem import for_older_code
from shared.errors import ConfigError, UserError
from shared.run import find_preset, flatten
from shared.stats import mean_std, paired_less, runs_to_show, welch_less

from .config import LLMRunConfig, data_keys

SCHEMA = 1
ALPHA = 0.01  # modded-nanogpt's bar for a record
MAX_CURVE_POINTS = 200
FIGURES = ("loss", "accuracy", "perplexity", "train_time_s")  # per run, summarised as mean ± sd
TESTED = {"loss": "loss", "time": "train_time_s"}  # comparison name -> per-run figure
LEADERBOARD = "LEADERBOARD.md"
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
ROOT = Path(__file__).resolve().parent.parent  # the checkout: paths in its workspace are written relative to it

# 5-dollar-llm's published records (docs/LEADERBOARD.md at 4ba324f): the best time per budget, and the
# best validation loss where another entry has it. One run each, on one RTX 4090.
PUBLISHED_SOURCE = "Open-Superintelligence-Lab/5-dollar-llm, docs/LEADERBOARD.md at commit 4ba324f"
PUBLISHED_HARDWARE = "RTX 4090 (Novita AI, Intel Xeon Platinum 8473C)"
PUBLISHED = (
    {"budget": 8_000_000, "tokens": 8_011_776, "val_loss": 4.8403, "time": "1m 26.178s", "date": "2025-12-23",
     "entry": "5, bf16 weights", "best": "4.8363 (entry 3, Polar Muon, 2025-12-22, 1m 28.664s)"},
    {"budget": 20_000_000, "tokens": 20_004_864, "val_loss": 4.1791, "time": "3m 19.165s", "date": "2025-12-23",
     "entry": "5, bf16 weights", "best": "4.1756 (entry 5 new eval, 2025-12-24, 3m 50.276s)"},
    {"budget": 100_000_000, "tokens": 100_007_936, "val_loss": 3.7094, "time": "16m 17.221s", "date": "2025-12-23",
     "entry": "4, bf16 weights", "best": "3.7094 (the same entry)"},
    {"budget": 1_000_000_000, "tokens": 1_000_007_680, "val_loss": 3.3583, "time": "2h 42m 49s", "date": "2025-12-23",
     "entry": "2, bf16 weights", "best": "3.3580 (entry 1, 2025-12-23, 2h 51m 31s)"},
)


def parse_budget(text: str) -> int:
    """'8M', '20M', '1B', '500k', '0.5M', '2048', '20_000_000' -> tokens."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?|\.[0-9]+)\s*([kKmMbBgG]?)\s*", text)
    try:
        tokens = Decimal(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).lower()] if m else None
    except InvalidOperation:
        tokens = None
    if tokens is None or tokens != tokens.to_integral_value() or tokens < 1:
        raise UserError(f"bad budget {text!r}: give a whole number of tokens such as 8M, 20M, 100M, 1B, 500k or 2048")
    return int(tokens)


def format_budget(tokens: int) -> str:
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if tokens % scale == 0:
            return f"{tokens // scale}{suffix}"
    return str(tokens)


def resolve_preset(preset: str, flag: str = "--preset") -> Path:
    """A name in configs/llm/ or a path to a TOML file."""
    path = Path(find_preset(preset, "llm", flag=flag))
    if not path.is_file():
        raise UserError(f"{flag} {preset!r}: no such file")
    return path


def derive_label(overrides: list[str], data_from: str | None = None) -> str:
    """'baseline' without overrides, else a file-safe name from them: optim.muon_lr=0.03 -> muon_lr-0.03
    (a long one is cut, with a hash of all the overrides so that two cut names still differ); on
    another preset's data, 'on-<that preset>' first."""
    if data_from:
        rest = derive_label(overrides)
        return f"on-{Path(data_from).stem}" + ("" if rest == "baseline" else f"_{rest}")
    if not overrides:
        return "baseline"
    parts = [k.split(".")[-1] + "-" + v.strip().strip("\"'") for k, _, v in (o.partition("=") for o in overrides)]
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-._")
    if len(label) > 40:
        label = label[:32].rstrip("-._") + "-" + hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:7]
    return label or "custom"


def check_label(label: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label):
        raise UserError(f"--label {label!r} may hold only letters, digits, '.', '_' and '-' (it names the record file)")
    return label


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout at root; (None, None) outside a git repository."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit.strip(), bool(status.strip())


# What names a machine. The CPU's model and vector ISA joined the records on 2026-12-03; older
# records hold neither, and a field one side lacks is not a difference (it is unknown).
HARDWARE_KEYS = ("device", "gpu", "cpu", "cpu_model", "cpu_isa", "cpu_threads")


def hardware_string(hw: dict | None) -> str:
    if not hw:
        return "unknown"
    if hw.get("gpu"):
        return str(hw["gpu"])
    isa = f" {hw['cpu_isa']}" if hw.get("cpu_isa") else ""
    return (f"{hw.get('device', 'cpu')} {hw.get('cpu_model') or hw.get('cpu', '')}{isa} "
            f"({hw.get('cpu_threads', '?')} threads)").replace("  ", " ")


# The seeds of one record may come from CPUs of different models when device, architecture, vector
# ISA and threads agree: the same kernels run, so a seed's loss is the same up to rounding, while
# its time is not. Such a record keeps each run's CPU model, names none in its hardware, and its
# time is compared as across hardware (the workplace's machines vary from session to session).
SEED_HARDWARE_KEYS = tuple(k for k in HARDWARE_KEYS if k != "cpu_model")


def hardware_differs(a: dict | None, b: dict | None, keys: tuple[str, ...] = HARDWARE_KEYS) -> str | None:
    """The first machine field two hardware tables both state and disagree on, or None."""
    a, b = a or {}, b or {}
    return next((k for k in keys if k in a and k in b and a[k] != b[k]), None)


def common_hardware(old: dict | None, new: dict | None) -> dict | None:
    """A merged record's hardware: the new runs' table less the machine fields the old runs did not
    record or recorded otherwise, so that seeds from an unnamed CPU are not labelled with the new
    one's name, nor seeds from two CPU models with one of them."""
    if old is None or new is None:
        return new
    return {k: v for k, v in new.items() if k not in HARDWARE_KEYS or (k in old and old[k] == v)}


def with_cpu_models(record: dict) -> list[dict]:
    """The record's runs, each naming the CPU model it ran on where the record knows it."""
    model = (record.get("hardware") or {}).get("cpu_model")
    return [{**r, "cpu_model": r.get("cpu_model") or model} for r in record["runs"]] if model else list(record["runs"])


def mixed_cpu_models(*records: dict) -> list[str]:
    """The CPU models the runs of these records name, when more than one ([] otherwise)."""
    models = sorted({r["cpu_model"] for rec in records for r in with_cpu_models(rec) if r.get("cpu_model")})
    return models if len(models) > 1 else []


def _subsample(points: list[list[float]], limit: int = MAX_CURVE_POINTS) -> list[list[float]]:
    if len(points) <= limit:
        return points
    keep = sorted({round(i * (len(points) - 1) / (limit - 1)) for i in range(limit)})  # first and last kept
    return [points[i] for i in keep]


def read_run(run_dir: Path, seed: int, shown: str | None = None) -> dict:
    """One finished training run folder: {"figures", "curves", "hardware", "config", "data"}. The
    record names the folder by `shown` (its place under the runs folder), never by an absolute path."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        config = tomllib.loads((run_dir / "config.toml").read_text())
        data = json.loads((run_dir / "data.json").read_text()) if (run_dir / "data.json").is_file() else None
        rows = [json.loads(line) for line in lines if line.strip()]
        ev = summary["final_eval"]
        figures = {"seed": seed, "loss": ev["loss"], "accuracy": ev.get("accuracy"), "perplexity": ev.get("perplexity"),
                   "train_time_s": summary["train_time_s"], "compile_warmup_s": summary.get("compile_warmup_s"),
                   "tokens_per_s": summary.get("tokens_per_s"), "cpu_others": summary.get("cpu_others"),
                   "cpu_model": (summary.get("hardware") or {}).get("cpu_model"),
                   "steps": summary["steps"], "tokens": summary.get("tokens"),
                   "params": summary.get("params"), "run_dir": shown or run_dir.name}
    except (OSError, KeyError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"run folder {run_dir} is incomplete or corrupt: {e!r}") from None
    if problem := run_problem(figures):
        raise UserError(f"run folder {run_dir} cannot be recorded: {problem}")
    curves = {"seed": seed, "eval": [[r["units"], r["loss"]] for r in rows if r.get("split") == "eval"],
              "train": _subsample([[r["units"], r["loss"]] for r in rows if r.get("split") == "train"])}
    return {"figures": figures, "curves": curves, "hardware": summary.get("hardware"), "config": portable_tree(config),
            "data": portable_tree(data)}


# ---------------------------------------------------------------------------------- portable names


def _is_abs_path(text: str) -> bool:
    return text.startswith(("/", "~"))


def path_hash(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (their names relative to it, and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def portable(text: str) -> str:
    """An absolute path as a record may hold it: relative to the checkout when it lies in the
    checkout's workspace (its parent folder, where a data folder may sit beside it), else `sha256:` and the
    hash of its content (`gone:NAME` when it no longer exists). Other strings stay as they are."""
    if not _is_abs_path(text):
        return text
    path = Path(text).expanduser()
    resolved = path.resolve()
    if resolved.is_relative_to(ROOT.parent):
        return os.path.relpath(resolved, ROOT)
    return f"sha256:{path_hash(resolved)}" if resolved.exists() else f"gone:{path.name}"


def portable_override(override: str) -> str:
    """`section.key=/abs/path` (quoted or not) with its path made portable."""
    key, sep, value = override.partition("=")
    quote = value[:1] if value[:1] in "\"'" and value[-1:] == value[:1] and len(value) > 1 else ""
    inner = value[1:-1] if quote else value
    return f"{key}{sep}{quote}{portable(inner.strip())}{quote}" if sep and _is_abs_path(inner.strip()) else override


def portable_tree(value):
    """A config or data description with every absolute path in it made portable."""
    if isinstance(value, dict):
        return {k: portable_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_tree(v) for v in value]
    return portable(value) if isinstance(value, str) else value


def same_name(a: object, b: object) -> bool:
    """Two portable values name the same thing: equal, or a path in the workspace and the `sha256:`
    name of its content (what a checkout outside the workspace writes for the same folder)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)) or a.startswith("sha256:") == b.startswith("sha256:"):
        return False
    named, path = (a, b) if a.startswith("sha256:") else (b, a)
    if not path or _is_abs_path(path) or path.startswith("gone:"):
        return False
    where = (ROOT / path).resolve()
    if not where.exists() or ROOT.resolve().is_relative_to(where):  # "" or ".." would hash the checkout
        return False
    try:  # hashed only here: the rare pair of one name of each kind
        return path_hash(where) == named.removeprefix("sha256:")
    except OSError:
        return False


def absolute_paths(record: dict) -> list[str]:
    """The absolute paths a record holds in its overrides, config, data and runs (none, once portable)."""
    found: list[str] = []

    def walk(value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and _is_abs_path(value.strip().strip("\"'")):
            found.append(value)

    walk([o.partition("=")[2] for o in record.get("overrides", []) if isinstance(o, str)])
    walk([record.get("config"), record.get("data"), [r.get("run_dir") for r in record.get("runs", []) if isinstance(r, dict)]])
    return found


# ---------------------------------------------------------------------------------- the data a record names


def record_data(record: dict) -> dict | None:
    """The data a record trained and evaluated on: its resolved [data] table (data_keys), paths
    portable; None for a record without its config."""
    table = (record.get("config") or {}).get("data")
    if not isinstance(table, dict):
        return None
    try:
        return portable_tree(data_keys(table))
    except ConfigError:
        return None


def _planned_table(preset: Path, data_from: Path | None, overrides: list[str]) -> dict:
    """The run config of this preset, --data_from and overrides as a table, before it is checked."""
    raw = renamed(LLMRunConfig, load_toml(preset))
    if data_from is not None:
        raw["data"] = {**raw.get("data", {}), **data_keys(renamed(LLMRunConfig, load_toml(data_from)).get("data", {}))}
    return apply_overrides(raw, list(overrides))


def planned_data(preset: Path, data_from: Path | None, overrides: list[str]) -> dict:
    """The data a speedrun of this preset, --data_from and overrides will train on (record_data's
    form), known before it trains."""
    data = _planned_table(preset, data_from, overrides).get("data", {})
    return portable_tree(data_keys(data if isinstance(data, dict) else {}))


def check_config(preset: Path, data_from: Path | None, overrides: list[str]) -> None:
    """Refuse the config a run of these would refuse in its first seconds (an unknown key, a value of
    the wrong type or out of range), before anything trains: a sweep's third value would otherwise
    be refused after the first two had trained for hours."""
    from_dict(LLMRunConfig, _planned_table(preset, data_from, overrides))


def data_words(data: dict | None, record: dict | None = None) -> tuple[str, str]:
    """(data, split) of a record in words, for the leaderboard."""
    if data is None:
        return "unknown", "unknown"
    what = f"{data['source']}"
    if data.get("ids_field"):
        what += f" ({data['ids_field']}, rows of {data['seq_len'] + 1})"
    tok = data["tokenizer"]
    seen = (record or {}).get("data") or {}
    if seen.get("sha256"):
        what += f", content {seen['sha256']}"
    if data["split"] == "train_test_split":
        read = f" of {seen['rows']:,} rows" if seen.get("rows") else (f" of the first {data['rows']:,} rows" if data.get("rows") else "")
        split = f"train_test_split({data['val_fraction']:g}, seed {data['split_seed']}){read}, {data['val_rows']:,} val rows"
    else:
        split = f"hash ({data['val_fraction']:g})"
    return f"{what}; tokenizer {tok}", split


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation (None for one run) of each figure over the runs."""
    out = {}
    for key in FIGURES:
        values = [r[key] for r in runs if r.get(key) is not None]
        mean, std = mean_std(values) if values else (None, None)
        out[key] = {"mean": mean, "std": std, "n": len(values)}
    return out


def build_record(*, label: str, preset: str, budget: int, overrides: list[str], runs: list[dict],
                 commit: str | None, dirty: bool | None, created: datetime, data_from: str | None = None) -> dict:
    """The record of finished runs (read_run's results, in seed order)."""
    figures = [r["figures"] for r in runs]
    record = {
        "schema": SCHEMA, "label": label, "preset": preset, "budget": budget,
        "overrides": [portable_override(o) for o in overrides],
        "created": created.isoformat(timespec="seconds"), "git_commit": commit, "git_dirty": dirty,
        "hardware": runs[0]["hardware"], "params": figures[0]["params"],
        "config": runs[0]["config"],  # resolved; the runs' configs differ only in train.seed
        "data": runs[0].get("data"),  # what the run read, with the content's hash
        "summary": summarise(figures), "runs": figures, "curves": [r["curves"] for r in runs],
    }
    return {**record, "data_from": data_from} if data_from else record


def _runnable(override: str, root: Path) -> str:
    """A record's override as a run takes it again: a path the record wrote relative to the checkout
    made absolute; one it could only name by content hash cannot be given back."""
    key, _, value = override.partition("=")
    inner = value.strip().strip("\"'")
    if inner.startswith(("sha256:", "gone:")):
        raise UserError(f"cannot extend: the override {override!r} named a path outside the workspace, which the "
                        "record keeps only as a content hash; train a new record with it instead")
    if inner and not _is_abs_path(inner) and (root / inner).exists():  # portable() wrote it relative to the checkout
        return f"{key}={json.dumps(str((root / inner).resolve()))}"
    return override


HARNESS = ("llm/speedrun.py", "llm/speedrun_plot.py", "llm/speedrun_sweep.py")  # record and draw runs; they train nothing


def affects_training(path: str) -> bool:
    """Whether a file of the checkout can change what a speedrun's training run does."""
    return (path.startswith(("llm/", "shared/", "configs/")) and path not in HARNESS) or \
        path in ("scripts/train_llm.py", "pyproject.toml")


def uncommitted_training_changes(root: Path, also: Sequence[str] = ()) -> list[str]:
    """The files with uncommitted changes (untracked ones included) that can change training, and
    those of `also` (the run's preset files, wherever they lie in the checkout): a record written
    since the last commit (benchmarks/records/) does not, so it leaves the next speedrun training
    the commit's code, recorded clean."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=all"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    entries, paths = out.split("\0"), []
    while entries:
        entry = entries.pop(0)
        if len(entry) > 3:
            paths.append(entry[3:])
            if entry[0] in "RC" and entries:  # a rename or copy: its old path follows
                paths.append(entries.pop(0))
    return [f for f in paths if affects_training(f) or f in also]


def training_code_changes(root: Path, old: str, new: str, benchmarks: bool = False) -> list[str] | None:
    """The files that can change training between two commits (None: the old one is not in this checkout);
    `benchmarks`: a script under benchmarks/ too (a benchmark's own trainer, such as nanochat_recipe.py)."""
    try:
        out = subprocess.run(["git", "diff", "--name-only", "--no-renames", old, new], cwd=root, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [f for f in out.stdout.splitlines()
            if affects_training(f) or (benchmarks and f.startswith("benchmarks/") and f.endswith(".py"))]


def extension_plan(name: str, record: dict, root: Path) -> dict:
    """What `--extend` trains: the record's preset, budget, overrides, data and label, from the next
    unused seed, with the training code of the record's commit (seeds of one record come from one
    training code; the harness may have changed since), which trains in a worktree of that commit
    (`commit_worktree`). `elsewhere` says how this checkout differs from it (uncommitted changes, or
    training code changed since), for the log; None when it does not."""
    commit, dirty = git_state(root)
    old = record.get("git_commit")
    if old is None or record.get("git_dirty") is not False:
        raise UserError(f"cannot extend {name}: it does not say which clean commit trained it")
    if commit is None:
        raise UserError(f"cannot extend {name}: this is not a git checkout, so the record's commit {old[:12]} is not here")
    changed = training_code_changes(root, old, commit) if commit != old else []
    if changed is None:
        raise UserError(f"cannot extend {name}: its commit {old[:12]} is not in this checkout (git fetch it)")
    elsewhere = (f"{changed[0]} changed since the record's commit" if changed else
                 "this checkout has uncommitted changes" if dirty else None)
    return {"preset": record["preset"], "budget": record["budget"], "label": record["label"],
            "overrides": [_runnable(o, root) for o in record.get("overrides", [])], "data_from": record.get("data_from"),
            "seed0": max(r["seed"] for r in record["runs"]) + 1, "commit": old, "elsewhere": elsewhere}


def older_code_env(code: Path) -> dict[str, str]:
    """Environment variables for the training processes of the checkout `code`: where its code predates
    shared/cpumem.py (an old record's commit, `--extend`), glibc's settings that make it keep freed
    memory as today's CPU trainer does (about 1.4x its speed, the same losses), unless the user chose
    malloc's behaviour; none otherwise."""
    return {} if (code / "shared" / "cpumem.py").exists() else for_older_code()


@contextmanager
def commit_worktree(root: Path, commit: str) -> Iterator[Path]:
    """A detached git worktree of `commit` in a temporary folder, removed afterwards (a killed run
    leaves an entry that `git worktree prune` clears): where an extension trains when this checkout's
    training code is not the record's."""
    parent = Path(tempfile.mkdtemp(prefix=f"blueberry-{commit[:12]}-"))
    tree = parent / "code"
    made = subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=root, capture_output=True,
                          text=True)
    if made.returncode != 0:
        shutil.rmtree(parent, ignore_errors=True)
        last = (made.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"cannot make a worktree of {commit[:12]} to train in: {last}")
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=root, capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)


def check_same_setup(record: dict, run: dict, name: str, verb: str = "extend") -> None:
    """A new run of an extension (or a record to merge) trained what the record's runs did: its
    resolved config equal but for the seed, on the same data, on the same hardware."""
    old, new = flatten(record.get("config") or {}), flatten(run["config"] or {})
    if differ := [k for k in sorted(set(old) | set(new)) if k != "train.seed" and not same_name(old.get(k), new.get(k))]:
        whose = "the new run's" if verb == "extend" else "its"
        raise UserError(f"cannot {verb} {name}: {whose} {differ[0]} is {_shown(new.get(differ[0]))}, the record's "
                        f"{_shown(old.get(differ[0]))}")
    if (record.get("data") or {}).get("sha256") != (run.get("data") or {}).get("sha256"):
        raise UserError(f"cannot {verb} {name}: the new run read data of another content than the record's runs")
    if (field := hardware_differs(record.get("hardware"), run.get("hardware"), SEED_HARDWARE_KEYS)) is not None:
        raise UserError(f"cannot {verb} {name}: its runs ran on {hardware_string(record.get('hardware'))}, this one on "
                        f"{hardware_string(run.get('hardware'))} (hardware.{field} differs)")


def merged_record(old: dict, new: dict, old_name: str) -> dict:
    """The record of an extension: the old record's runs and curves, then the new ones; `extends`
    names the record it supersedes (the leaderboard then shows only the merged one)."""
    runs, curves = [*with_cpu_models(old), *with_cpu_models(new)], [*old.get("curves", []), *new["curves"]]
    return {**new, "runs": runs, "curves": curves, "summary": summarise(runs), "extends": Path(old_name).name,
            "hardware": common_hardware(old.get("hardware"), new.get("hardware"))}


def merge_records(named: list[tuple[str, dict]], root: Path) -> dict:
    """One record holding the seeds of several records of one setup (seeds run at different times, or
    by a trainer without --extend, such as benchmarks/nanochat_recipe.py): the same preset, budget,
    label, resolved config but for the seed, data and hardware, distinct seeds, and clean commits
    with the same training code (a benchmark script under benchmarks/ counts as training code).
    `merges` names them: the leaderboard shows the merged record in their place."""
    if len(named) < 2:
        raise UserError("--merge needs two or more records")
    (first_name, first), rest = named[0], named[1:]
    seen = {r["seed"]: first_name for r in first["runs"]}
    for name, rec in named:
        if rec.get("git_commit") is None or rec.get("git_dirty") is not False:
            raise UserError(f"cannot merge {name}: it does not say which clean commit trained it")
    for name, rec in rest:
        for key in ("preset", "budget", "label"):
            if rec[key] != first[key]:
                raise UserError(f"cannot merge {name} with {first_name}: its {key} is {_shown(rec[key])}, "
                                f"the other's {_shown(first[key])}")
        check_same_setup(first, rec, name, "merge")
        if rec["git_commit"] != first["git_commit"]:
            changed = training_code_changes(root, first["git_commit"], rec["git_commit"], benchmarks=True)
            if changed is None:
                raise UserError(f"cannot merge {name}: the commits {first['git_commit'][:12]} and {rec['git_commit'][:12]} "
                                "are not both in this checkout (git fetch them)")
            if changed:
                raise UserError(f"cannot merge {name} with {first_name}: {changed[0]} differs between their commits, "
                                "and the seeds of one record come from one training code")
        for r in rec["runs"]:
            if r["seed"] in seen:
                raise UserError(f"cannot merge {name}: seed {r['seed']} is in {seen[r['seed']]} too")
            seen[r["seed"]] = name
    runs = sorted((r for _, rec in named for r in with_cpu_models(rec)), key=lambda r: r["seed"])
    curves = [c for _, rec in named for c in rec.get("curves", [])]
    merged = {k: v for k, v in first.items() if k not in ("comparison", "screen", "extends")}
    # the records an input extended are superseded too: the leaderboard hides everything merged here
    names = [Path(n).name for n, _ in named] + [rec["extends"] for _, rec in named if rec.get("extends")]
    hardware = first.get("hardware")
    for _, rec in rest:
        hardware = common_hardware(rec.get("hardware"), hardware)
    return {**merged, "runs": runs, "curves": curves, "summary": summarise(runs), "merges": names, "hardware": hardware}


def write_record(record: dict, records_dir: Path, created: datetime, replace: Path | None = None) -> Path:
    """records_dir/<preset>-<budget>-<label>-<YYYYmmdd-HHMMSS>.json, never overwriting one; `replace`:
    the path this speedrun wrote before (its seeds so far), rewritten whole (a stop never leaves half a file)."""
    if problem := record_problem(record):  # never write a record that would not be read back
        raise UserError(f"the record is not valid: {problem}")
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    if replace is not None:
        write_file_atomic(replace, lambda p: p.write_text(text), "the record")
        return replace
    stem = f"{record['preset']}-{format_budget(record['budget'])}-{record['label']}-{created:%Y%m%d-%H%M%S}"
    for i in range(1, 100):
        path = records_dir / (stem + (f"-{i}" if i > 1 else "") + ".json")
        try:
            with open(path, "x") as f:
                f.write(text)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    raise UserError(f"too many records named {stem} in {records_dir}")


def _shown(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    text = json.dumps(value) if isinstance(value, (str, list, dict, bool)) or value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_problem(run: object, where: str = "") -> str:
    """What makes one run's figures unusable ("" = nothing): loss and train_time_s must be finite
    numbers, accuracy and perplexity finite numbers or null."""
    if not isinstance(run, dict):
        return f"{where or 'a run'} is {_shown(run)}, not a table of figures"
    for key in ("loss", "train_time_s", "accuracy", "perplexity", "cpu_others"):
        value = run.get(key)
        if (value is not None or key in ("loss", "train_time_s")) and not _is_number(value):
            return f"{where}{'.' if where else ''}{key} is {_shown(value) if key in run else 'missing'}, not a finite number"
    if run.get("cpu_model") is not None and not isinstance(run["cpu_model"], str):
        return f"{where}{'.' if where else ''}cpu_model is {_shown(run['cpu_model'])}, not a string or null"
    return ""


# field -> (check, what it must be); a field absent from the record passes unless it is required
_FIELDS = {
    "label": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "preset": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "budget": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number of tokens"),
    "overrides": (lambda v: isinstance(v, list) and all(isinstance(o, str) for o in v), "a list of strings"),
    "hardware": (lambda v: v is None or isinstance(v, dict), "a table or null"),
    "created": (lambda v: isinstance(v, str), "a string"),
    "git_commit": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "git_dirty": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "runs": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list"),
    "data": (lambda v: v is None or isinstance(v, dict), "a table or null"),
    "extends": (lambda v: isinstance(v, str) and v != "", "a record's file name"),
    "merges": (lambda v: isinstance(v, list) and all(isinstance(n, str) and n for n in v), "a list of record file names"),
}
REQUIRED = ("label", "preset", "budget", "runs")


def record_problem(record: object) -> str:
    """What makes a record unusable ("" = nothing): its schema, its fields' types, non-finite figures."""
    if not isinstance(record, dict):
        return f"it holds {type(record).__name__}, not a JSON object"
    if record.get("schema") != SCHEMA:
        return f"schema is {_shown(record.get('schema'))}, this code reads schema {SCHEMA}"
    for key, (ok, what) in _FIELDS.items():
        if key not in record:
            if key in REQUIRED:
                return f"it has no {key!r}"
        elif not ok(record[key]):
            return f"{key} is {_shown(record[key])}, not {what}"
    for i, run in enumerate(record["runs"]):
        if problem := run_problem(run, f"runs[{i}]"):
            return problem
    if paths := absolute_paths(record):
        return f"it holds the absolute path {_shown(paths[0])} (a record names data by spec or content hash)"
    return ""


def _read(path: Path) -> tuple[dict | None, str]:
    """(record, "") for a valid record file, else (None, what is wrong with it)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot be read ({e.strerror if isinstance(e, OSError) and e.strerror else e})"
    except json.JSONDecodeError as e:
        return None, f"corrupt JSON ({e.msg} at line {e.lineno} column {e.colno})"
    problem = record_problem(record)
    return (None, problem) if problem else (record, "")


def load_record(path: str | Path) -> dict:
    """A record read and checked: a record that breaks the schema, or holds a NaN or a non-number
    where a figure belongs, is refused in one line naming the field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"record not found: {path}")
    record, problem = _read(path)
    if record is None:
        raise UserError(f"{path} is not a valid speedrun record: {problem}")
    return record


def read_records(records_dir: Path) -> tuple[list[tuple[dict, str]], list[tuple[str, str]]]:
    """Every valid record in records_dir as (record, file name), and the others as (file name, why)."""
    good, bad = [], []
    for path in sorted(records_dir.glob("*.json")):
        record, problem = _read(path)
        if record is None:
            bad.append((path.name, problem))
        else:
            good.append((record, path.name))
    return good, bad


def require_runs(n: int, what: str) -> None:
    if n < 2:
        raise UserError(f"a comparison needs >= 2 runs per side: {what} has {n}")


def check_comparable(base: dict, new_preset: str, new_budget: int, base_name: str, new_data: dict | None = None) -> None:
    """Two records compare at the same budget on the same data (any presets); records without a
    config (no data to tell) only within one preset."""
    if base["budget"] != new_budget:
        raise UserError(f"cannot compare: the baseline {base_name} is {base['preset']} at {base['budget']:,} tokens, "
                        f"this is {new_preset} at {new_budget:,} tokens")
    base_data = record_data(base)
    if base_data is None or new_data is None:
        if base["preset"] != new_preset:
            raise UserError(f"cannot compare: the baseline {base_name} is {base['preset']}, this is {new_preset}, and "
                            "one of them does not say what data it trained on")
        return
    if differ := [k for k in sorted(set(base_data) | set(new_data)) if not same_name(base_data.get(k), new_data.get(k))]:
        k = differ[0]
        raise UserError(f"cannot compare: the baseline {base_name} trained on other data (data.{k} = "
                        f"{_shown(base_data.get(k))}, this run {_shown(new_data.get(k))}); --data_from PRESET trains "
                        "on another preset's data")


def compare(base: dict, new: dict, base_name: str, confidence: float = 0.95) -> dict:
    """Welch's one-sided test (new < baseline) in final loss and in training time."""
    check_comparable(base, new["preset"], new["budget"], base_name, record_data(new))
    require_runs(len(base["runs"]), f"the baseline {base_name}")
    require_runs(len(new["runs"]), "the candidate")
    out = {"baseline": Path(base_name).name, "baseline_label": base["label"], "baseline_preset": base["preset"],
           "test": "Welch's t-test, one-sided (new < baseline)",
           "alpha": ALPHA, "same_hardware": hardware_differs(base.get("hardware"), new.get("hardware")) is None
           and not mixed_cpu_models(base, new)}
    for name, key in TESTED.items():
        w = welch_less([r[key] for r in new["runs"]], [r[key] for r in base["runs"]], confidence)
        out[name] = {**w.to_dict(), "better": w.p < ALPHA}
    # A seed fixes a run's batches (and, for one shape, its init): the loss of the seeds both records
    # ran, paired, is a second, more powerful test beside Welch's (which stays the verdict).
    by_seed = {r["seed"]: r["loss"] for r in base["runs"]}
    seeds = sorted(r["seed"] for r in new["runs"] if r["seed"] in by_seed)
    if len(seeds) >= 2:
        ours = {r["seed"]: r["loss"] for r in new["runs"]}
        pt = paired_less([ours[s] for s in seeds], [by_seed[s] for s in seeds], confidence)
        out["loss_paired"] = {**pt.to_dict(), "seeds": seeds, "better": pt.p < ALPHA}
    out["loss_runs_to_show"] = runs_needed(out, [r["loss"] for r in new["runs"]], [r["loss"] for r in base["runs"]])
    shared = {side: shared_seeds(rec) for side, rec in (("baseline", base), ("new", new))}
    if any(shared.values()):
        out["shared_cpu"] = shared
    return out


POWER = 0.8  # the chance of a verdict that the seeds-to-a-verdict estimate plans for
MOST_RUNS = 200  # beyond this the estimate says only "over"


def runs_needed(cmp: dict, new: list[float], base: list[float]) -> dict | None:
    """For a lower loss not shown: runs a side (Welch) and seeds (paired) at which a difference and
    spread as measured would be shown at ALPHA with POWER (null where over MOST_RUNS); None otherwise."""
    loss = cmp["loss"]
    if loss["better"] or loss["diff"] >= 0:
        return None
    out = {"power": POWER, "welch": runs_to_show(loss["diff"], mean_std(new)[1], mean_std(base)[1], ALPHA, POWER,
                                                 most=MOST_RUNS)}
    if (pt := cmp.get("loss_paired")) and not pt["better"] and pt["diff"] < 0:
        out["paired"] = runs_to_show(pt["diff"], pt["sd_diff"], 0.0, ALPHA, POWER, paired=True, most=MOST_RUNS)
    return out


def _runs_to_show_line(need: dict, alpha: float) -> str:
    def shown(n, what):
        return f"over {MOST_RUNS} {what}" if n is None else f"about {n} {what}"
    text = (f"to a verdict: were the difference and spread as measured, Welch's test would show it at p < {alpha:g} "
            f"with {need['power']:.0%} power at {shown(need['welch'], 'runs a side')}")
    if "paired" in need:
        text += f", the paired test at {shown(need['paired'], 'shared seeds')}"
    return text + " (measured values flatter an effect picked for looking good: a floor, not a promise)"


def time_mark(record: dict) -> str:
    """What a table says beside a record's time when it is not one machine's, alone."""
    return (" (shared CPU)" if shared_seeds(record) else "") + (" (several CPU models)" if mixed_cpu_models(record) else "")


def shared_seeds(record: dict) -> dict[int, float]:
    """seed -> others' CPU share of the runs that trained on a shared machine (shared/cpuload.py);
    records made before it was measured name none."""
    return {r["seed"]: r["cpu_others"] for r in record["runs"] if shared_note(r.get("cpu_others"))}


def _p(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def verdict(name: str, result: dict, alpha: float = ALPHA) -> str:
    word = "better" if result["better"] else "not shown better"
    return f"{name}: {word} at p < {alpha:g} (p = {_p(result['p'])})"


def comparison_lines(cmp: dict, new_name: str = "new") -> list[str]:
    """The comparison as an aligned table and the two verdict lines."""
    lines = [f"compared with {cmp['baseline']} ({cmp['baseline_label']}): {cmp['test']}"]
    if not cmp["same_hardware"]:
        lines.append("warning: the two records ran on different hardware (or one's seeds on several CPU models); "
                     "the time comparison is across hardware")
    for side, seeds in cmp.get("shared_cpu", {}).items():
        if seeds:
            shares = ", ".join(f"seed {k} {v:.0%}" for k, v in sorted(seeds.items(), key=lambda kv: int(kv[0])))
            lines.append(f"warning: {'the baseline' if side == 'baseline' else new_name} trained beside other processes "
                         f"({shares} of the CPU): its time is not the recipe's alone")
    level = f"{cmp['loss']['confidence'] * 100:g}% CI"
    header = ["", f"baseline (n={cmp['loss']['n_base']})", f"{new_name} (n={cmp['loss']['n_new']})", "difference",
              level, "Hedges' g", "p"]
    rows = [header]
    for name, digits, unit in (("loss", 4, ""), ("time", 2, " s")):
        r = cmp[name]
        f = lambda v: f"{v:+.{digits}f}"  # noqa: E731
        g = "n/a" if r["hedges_g"] is None else f"{r['hedges_g']:+.2f}"
        rows.append([f"val {name}" if name == "loss" else "train time", f"{r['mean_base']:.{digits}f}{unit}",
                     f"{r['mean_new']:.{digits}f}{unit}", f(r["diff"]) + unit, f"[{f(r['ci'][0])}, {f(r['ci'][1])}]",
                     g, _p(r["p"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines += [verdict("loss", cmp["loss"], cmp["alpha"]), verdict("time", cmp["time"], cmp["alpha"])]
    if pt := cmp.get("loss_paired"):
        lines.append(f"paired by seed ({_seed_list(pt['seeds'])}): loss difference {pt['diff']:+.4f} "
                     f"[{pt['ci'][0]:+.4f}, {pt['ci'][1]:+.4f}]; " + verdict("loss", pt, cmp["alpha"]).removeprefix("loss: ")
                     + " (a second test; the verdict is Welch's)")
    if need := cmp.get("loss_runs_to_show"):
        lines.append(_runs_to_show_line(need, cmp["alpha"]))
    return lines


def _seed_list(seeds: list[int]) -> str:
    return f"seeds {seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else \
        "seeds " + ", ".join(map(str, seeds))


def _pm(s: dict, digits: int) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")


def summary_lines(record: dict) -> list[str]:
    s = summarise(record["runs"])
    rows = [("val loss", _pm(s["loss"], 4) + f" (n={s['loss']['n']})"), ("val accuracy", _pm(s["accuracy"], 4)),
            ("val perplexity", _pm(s["perplexity"], 2)), ("train time", _pm(s["train_time_s"], 2) + " s (compile excluded)")]
    if shared := shared_seeds(record):
        rows.append(("shared CPU", ", ".join(f"seed {k}: others used {v:.0%}" for k, v in shared.items())
                     + " (its time is not the recipe's alone)"))
    width = max(len(k) for k, _ in rows) + 2
    return [f"{k:<{width}}{v}" for k, v in rows]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _group_key(rec: dict) -> tuple[int, str]:
    """Records ranked together: one budget on one data (a record without its config: its preset)."""
    data = record_data(rec)
    return rec["budget"], json.dumps(data, sort_keys=True) if data is not None else f"preset:{rec['preset']}"


def leaderboard(records_dir: Path) -> str:
    """LEADERBOARD.md from every valid record in records_dir: one table per (data, budget), best mean
    loss first, each row naming its preset, data, split and hardware; then 5-dollar-llm's published
    records as a separate reference table, and the records left out and why. Depends only on the
    records' contents, so regenerating without new records gives the same bytes."""
    groups: dict[tuple[int, str], list[tuple[dict, str]]] = {}
    records, left_out = read_records(records_dir)
    # their runs are in the extension or the merge
    superseded = {rec["extends"] for rec, _ in records if rec.get("extends")}
    superseded |= {n for rec, _ in records for n in rec.get("merges", [])}
    for rec, name in records:
        if name not in superseded:
            groups.setdefault(_group_key(rec), []).append((rec, name))
    out = ["# Speedrun leaderboard", "",
           "Generated by `python scripts/speedrun.py --leaderboard` from the records in this folder; do not edit it "
           "by hand.", "",
           "Each row is one record: n runs with different seeds; mean ± sample standard deviation of the final "
           "validation loss and of the training time (compile warm-up and evaluation excluded). A table ranks the "
           "records of one budget on one data set, whatever their presets; a record extended with more seeds "
           "(`--extend`) is shown by its extension, records merged into one (`--merge`) by the merge. A change counts as better than its "
           f"baseline when Welch's one-sided t-test gives p < {ALPHA:g} (`scripts/speedrun.py --compare`).", ""]
    if not groups:
        out += ["No records yet.", ""]
    headings: dict[str, int] = {}
    for key in sorted(groups, key=lambda k: (groups[k][0][0]["preset"] if k[1].startswith("preset:") else "", k)):
        rows = sorted(groups[key], key=lambda rn: (summarise(rn[0]["runs"])["loss"]["mean"], rn[0]["label"], rn[1]))
        data = record_data(rows[0][0])
        title = f"{rows[0][0]['preset'] if data is None else data['source']}, {format_budget(key[0])} tokens"
        headings[title] = headings.get(title, 0) + 1
        out += [f"## {title}" + (f" ({headings[title]})" if headings[title] > 1 else ""), "",
                "| rank | preset | label | val loss | n | val accuracy | train time (s) | data | split | hardware | commit "
                "| date | record | overrides |",
                "| ---: | --- | --- | --- | ---: | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for rank, (rec, name) in enumerate(rows, 1):
            s = summarise(rec["runs"])
            commit = (rec.get("git_commit") or "unknown")[:7] + ("+dirty" if rec.get("git_dirty") else "")
            overrides = " ".join(f"`{o}`" for o in rec.get("overrides", [])) or "none"
            if rec.get("data_from"):
                overrides = f"`--data_from {rec['data_from']}` " + (overrides if rec.get("overrides") else "")
            what, split = data_words(record_data(rec), rec)
            cells = [str(rank), rec["preset"], rec["label"], _pm(s["loss"], 4), str(s["loss"]["n"]), _pm(s["accuracy"], 4),
                     _pm(s["train_time_s"], 2) + time_mark(rec), what, split, hardware_string(rec.get("hardware")), commit,
                     str(rec.get("created", ""))[:10], _record_links(records_dir, name), overrides.strip()]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    out += published_table()
    if left_out:
        out += ["## Left out", "", "Records that do not read as valid records, so are not ranked:", ""]
        out += [f"- `{name}`: {_cell(why)}" for name, why in left_out] + [""]
    return "\n".join(out)


def published_table() -> list[str]:
    """5-dollar-llm's published records as a reference table: not measured here, never ranked."""
    out = ["## Reference: 5-dollar-llm's published records (not measured here)", "",
           f"From {PUBLISHED_SOURCE}. One run per entry on one {PUBLISHED_HARDWARE}, no spread reported; their time "
           "is their \"Training Time\" (compile warm-up excluded, the final evaluation included). Their data, split, "
           "evaluation and recipe are what the `5dollar-88m` preset reproduces (benchmarks/results/llm_5dollar.md "
           "lists what it does not); these rows are not ranked with the measured ones.", "",
           "| budget | val loss | time | tokens trained | entry | date | best val loss | hardware | source |",
           "| --- | --- | --- | ---: | --- | --- | --- | --- | --- |"]
    for r in PUBLISHED:
        cells = [format_budget(r["budget"]), f"{r['val_loss']:.4f}", r["time"], f"{r['tokens']:,}", r["entry"], r["date"],
                 r["best"], PUBLISHED_HARDWARE, "5-dollar-llm docs/LEADERBOARD.md (4ba324f)"]
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return out + [""]


def _record_links(records_dir: Path, name: str) -> str:
    """The record, and its picture when one was drawn beside it."""
    png = Path(name).with_suffix(".png").name
    return f"[{name}]({name})" + (f" ([plot]({png}))" if (Path(records_dir) / png).is_file() else "")


def _print(*args) -> None:
    print(*args, flush=True)


def write_leaderboard(records_dir: Path, note: Callable = _print) -> Path:
    """Rewrite LEADERBOARD.md; each record left out of it is named, with why, through `note`."""
    for name, why in read_records(records_dir)[1]:
        note(f"note: left {records_dir / name} out of the leaderboard: {why}")
    path = records_dir / LEADERBOARD
    try:
        path.write_text(leaderboard(records_dir))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return path
