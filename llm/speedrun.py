"""Speedrun records: several seeded runs of one preset at one token budget, summarised as mean and
spread; a comparison with a recorded baseline by Welch's one-sided t-test (the GPT-2 speedrun's
rule: a change counts when it is better at p < 0.01); and a leaderboard generated from the records.

A record is one JSON file; everything shown (summary, leaderboard) is recomputed from its per-run
figures, so a record cannot disagree with itself."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import tomllib
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable

from shared.errors import UserError
from shared.run import find_preset
from shared.stats import mean_std, welch_less

SCHEMA = 1
ALPHA = 0.01  # modded-nanogpt's bar for a record
MAX_CURVE_POINTS = 200
FIGURES = ("loss", "accuracy", "perplexity", "train_time_s")  # per run, summarised as mean ± sd
TESTED = {"loss": "loss", "time": "train_time_s"}  # comparison name -> per-run figure
LEADERBOARD = "LEADERBOARD.md"
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


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


def resolve_preset(preset: str) -> Path:
    """A name in configs/llm/ or a path to a TOML file."""
    path = Path(find_preset(preset, "llm", flag="--preset"))
    if not path.is_file():
        raise UserError(f"--preset {preset!r}: no such file")
    return path


def derive_label(overrides: list[str]) -> str:
    """'baseline' without overrides, else a file-safe name from them: optim.muon_lr=0.03 -> muon_lr-0.03
    (a long one is cut, with a hash of all the overrides so that two cut names still differ)."""
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


def hardware_string(hw: dict | None) -> str:
    if not hw:
        return "unknown"
    if hw.get("gpu"):
        return str(hw["gpu"])
    return f"{hw.get('device', 'cpu')} {hw.get('cpu', '')} ({hw.get('cpu_threads', '?')} threads)".replace("  ", " ")


def _subsample(points: list[list[float]], limit: int = MAX_CURVE_POINTS) -> list[list[float]]:
    if len(points) <= limit:
        return points
    keep = sorted({round(i * (len(points) - 1) / (limit - 1)) for i in range(limit)})  # first and last kept
    return [points[i] for i in keep]


def read_run(run_dir: Path, seed: int) -> dict:
    """One finished training run folder: {"figures", "curves", "hardware", "config"}."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        config = tomllib.loads((run_dir / "config.toml").read_text())
        rows = [json.loads(line) for line in lines if line.strip()]
        ev = summary["final_eval"]
        figures = {"seed": seed, "loss": ev["loss"], "accuracy": ev.get("accuracy"), "perplexity": ev.get("perplexity"),
                   "train_time_s": summary["train_time_s"], "compile_warmup_s": summary.get("compile_warmup_s"),
                   "tokens_per_s": summary.get("tokens_per_s"), "steps": summary["steps"], "tokens": summary.get("tokens"),
                   "params": summary.get("params"), "run_dir": str(run_dir)}
    except (OSError, KeyError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"run folder {run_dir} is incomplete or corrupt: {e!r}") from None
    if problem := run_problem(figures):
        raise UserError(f"run folder {run_dir} cannot be recorded: {problem}")
    curves = {"seed": seed, "eval": [[r["units"], r["loss"]] for r in rows if r.get("split") == "eval"],
              "train": _subsample([[r["units"], r["loss"]] for r in rows if r.get("split") == "train"])}
    return {"figures": figures, "curves": curves, "hardware": summary.get("hardware"), "config": config}


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation (None for one run) of each figure over the runs."""
    out = {}
    for key in FIGURES:
        values = [r[key] for r in runs if r.get(key) is not None]
        mean, std = mean_std(values) if values else (None, None)
        out[key] = {"mean": mean, "std": std, "n": len(values)}
    return out


def build_record(*, label: str, preset: str, budget: int, overrides: list[str], runs: list[dict],
                 commit: str | None, dirty: bool | None, created: datetime) -> dict:
    """The record of finished runs (read_run's results, in seed order)."""
    figures = [r["figures"] for r in runs]
    return {
        "schema": SCHEMA, "label": label, "preset": preset, "budget": budget, "overrides": list(overrides),
        "created": created.isoformat(timespec="seconds"), "git_commit": commit, "git_dirty": dirty,
        "hardware": runs[0]["hardware"], "params": figures[0]["params"],
        "config": runs[0]["config"],  # resolved; the runs' configs differ only in train.seed
        "summary": summarise(figures), "runs": figures, "curves": [r["curves"] for r in runs],
    }


def write_record(record: dict, records_dir: Path, created: datetime) -> Path:
    """records_dir/<preset>-<budget>-<label>-<YYYYmmdd-HHMMSS>.json, never overwriting one."""
    if problem := record_problem(record):  # never write a record that would not be read back
        raise UserError(f"the record is not valid: {problem}")
    stem = f"{record['preset']}-{format_budget(record['budget'])}-{record['label']}-{created:%Y%m%d-%H%M%S}"
    for i in range(1, 100):
        path = records_dir / (stem + (f"-{i}" if i > 1 else "") + ".json")
        try:
            with open(path, "x") as f:
                f.write(json.dumps(record, indent=1, sort_keys=True) + "\n")
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
    for key in ("loss", "train_time_s", "accuracy", "perplexity"):
        value = run.get(key)
        if (value is not None or key in ("loss", "train_time_s")) and not _is_number(value):
            return f"{where}{'.' if where else ''}{key} is {_shown(value) if key in run else 'missing'}, not a finite number"
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


def check_comparable(base: dict, new_preset: str, new_budget: int, base_name: str) -> None:
    if (base["preset"], base["budget"]) != (new_preset, new_budget):
        raise UserError(f"cannot compare: the baseline {base_name} is {base['preset']} at {base['budget']:,} tokens, "
                        f"this is {new_preset} at {new_budget:,} tokens")


def compare(base: dict, new: dict, base_name: str, confidence: float = 0.95) -> dict:
    """Welch's one-sided test (new < baseline) in final loss and in training time."""
    check_comparable(base, new["preset"], new["budget"], base_name)
    require_runs(len(base["runs"]), f"the baseline {base_name}")
    require_runs(len(new["runs"]), "the candidate")
    out = {"baseline": base_name, "baseline_label": base["label"], "test": "Welch's t-test, one-sided (new < baseline)",
           "alpha": ALPHA, "same_hardware": hardware_string(base.get("hardware")) == hardware_string(new.get("hardware"))}
    for name, key in TESTED.items():
        w = welch_less([r[key] for r in new["runs"]], [r[key] for r in base["runs"]], confidence)
        out[name] = {**w.to_dict(), "better": w.p < ALPHA}
    return out


def _p(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def verdict(name: str, result: dict, alpha: float = ALPHA) -> str:
    word = "better" if result["better"] else "not shown better"
    return f"{name}: {word} at p < {alpha:g} (p = {_p(result['p'])})"


def comparison_lines(cmp: dict, new_name: str = "new") -> list[str]:
    """The comparison as an aligned table and the two verdict lines."""
    lines = [f"compared with {cmp['baseline']} ({cmp['baseline_label']}): {cmp['test']}"]
    if not cmp["same_hardware"]:
        lines.append("warning: the two records ran on different hardware; the time comparison is across hardware")
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
    return lines + [verdict("loss", cmp["loss"], cmp["alpha"]), verdict("time", cmp["time"], cmp["alpha"])]


def _pm(s: dict, digits: int) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")


def summary_lines(record: dict) -> list[str]:
    s = summarise(record["runs"])
    rows = [("val loss", _pm(s["loss"], 4) + f" (n={s['loss']['n']})"), ("val accuracy", _pm(s["accuracy"], 4)),
            ("val perplexity", _pm(s["perplexity"], 2)), ("train time", _pm(s["train_time_s"], 2) + " s (compile excluded)")]
    width = max(len(k) for k, _ in rows) + 2
    return [f"{k:<{width}}{v}" for k, v in rows]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def leaderboard(records_dir: Path) -> str:
    """LEADERBOARD.md from every valid record in records_dir: one table per (preset, budget), best mean
    loss first, then the records left out and why. Depends only on the records' contents, so
    regenerating without new records gives the same bytes."""
    groups: dict[tuple[str, int], list[tuple[dict, str]]] = {}
    records, left_out = read_records(records_dir)
    for rec, name in records:
        groups.setdefault((rec["preset"], rec["budget"]), []).append((rec, name))
    out = ["# Speedrun leaderboard", "",
           "Generated by `python scripts/speedrun.py --leaderboard` from the records in this folder; do not edit it "
           "by hand.", "",
           "Each row is one record: n runs with different seeds; mean ± sample standard deviation of the final "
           "validation loss and of the training time (compile warm-up excluded). A change counts as better than its "
           f"baseline when Welch's one-sided t-test gives p < {ALPHA:g} (`scripts/speedrun.py --compare`).", ""]
    if not groups:
        out += ["No records yet.", ""]
    for (preset, budget) in sorted(groups):
        rows = sorted(groups[(preset, budget)], key=lambda rn: (summarise(rn[0]["runs"])["loss"]["mean"], rn[0]["label"], rn[1]))
        out += [f"## {preset}, {format_budget(budget)} tokens", "",
                "| rank | label | val loss | n | val accuracy | train time (s) | hardware | commit | date | record | overrides |",
                "| ---: | --- | --- | ---: | --- | --- | --- | --- | --- | --- | --- |"]
        for rank, (rec, name) in enumerate(rows, 1):
            s = summarise(rec["runs"])
            commit = (rec.get("git_commit") or "unknown")[:7] + ("+dirty" if rec.get("git_dirty") else "")
            overrides = " ".join(f"`{o}`" for o in rec.get("overrides", [])) or "none"
            cells = [str(rank), rec["label"], _pm(s["loss"], 4), str(s["loss"]["n"]), _pm(s["accuracy"], 4),
                     _pm(s["train_time_s"], 2), hardware_string(rec.get("hardware")), commit,
                     str(rec.get("created", ""))[:10], f"[{name}]({name})", overrides]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    if left_out:
        out += ["## Left out", "", "Records that do not read as valid records, so are not ranked:", ""]
        out += [f"- `{name}`: {_cell(why)}" for name, why in left_out] + [""]
    return "\n".join(out)


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
