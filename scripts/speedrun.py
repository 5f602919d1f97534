"""Speedrun: N seeded training runs of an LLM preset at a token budget, summarised (mean ± sample
standard deviation), recorded under benchmarks/records/, optionally tested against a baseline
record (Welch's one-sided t-test, better at p < 0.01; under 2 runs on either side, a screen without a
test), and the leaderboard regenerated.

    python scripts/speedrun.py --preset blueberry-88m --budget 8M --runs 4
    python scripts/speedrun.py --preset blueberry-88m --budget 8M --runs 4 optim.muon_lr=0.03 \\
        --compare benchmarks/records/blueberry-88m-8M-baseline-20250101-120000.json
    python scripts/speedrun.py --extend NEW.json --runs 2 --compare BASE.json  # 2 more seeds of NEW, tested again
    python scripts/speedrun.py --extend A.json B.json --runs 2 --compare BASE.json  # each in turn, then side by side
    python scripts/speedrun.py --compare BASE.json --candidate NEW.json     # two records, no training
    python scripts/speedrun.py --compare BASE.json --candidate A.json B.json C.json  # side by side, as a sweep
    python scripts/speedrun.py --merge NEW.json NEW-seeds34.json --compare BASE.json  # one record of both's seeds
    python scripts/speedrun.py --preset cpu-16m --budget 1M --runs 3 --sweep optim.muon_lr=0.01,0.02,0.04  # a record a value
    python scripts/speedrun.py --preset cpu-16m --budget 1M --runs 3 --variant 'no-smear: model.smear=false' \\
        --variant 'no-softcap: model.logit_softcap=0'                      # a record a named variant (an ablation)
    python scripts/speedrun.py --leaderboard                                  # rewrite LEADERBOARD.md

5-dollar-llm's benchmark: their recipe, then Blueberry's on the same data, tested against it:

    python scripts/speedrun.py --preset 5dollar-88m --budget 8M --runs 4
    python scripts/speedrun.py --preset blueberry-88m --data_from 5dollar-88m --budget 8M --runs 4 \\
        --compare benchmarks/records/5dollar-88m-8M-baseline-<stamp>.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from llm.speedrun import (build_record, check_comparable, check_config, check_label, check_same_setup, commit_worktree,
                          derive_label, extension_plan, format_budget, git_state, load_record, merge_records,
                          merged_record, older_code_env, parse_budget, planned_data, read_records, read_run, record_data,
                          resolve_preset, summary_lines, uncommitted_training_changes, write_leaderboard, write_record)
from llm.speedrun_plot import plot_records, plot_sweep
from llm.speedrun_screen import judge, picture_title
from llm.speedrun_sweep import parse_sweep, parse_variants, sweep_lines
from shared.cpumem import SWITCH
from shared.errors import UserError, run_main
from shared.run import check_writable, finite_float

ROOT = Path(__file__).resolve().parent.parent
RESERVED = ("train.seed", "train.budget")  # set by --seed0 and --budget, never by an override


def train_one(cmd: list[str], what: str, code: Path = ROOT, extra_env: dict[str, str] | None = None) -> None:
    """Run one training subprocess with the packages of the checkout `code`; its stdout is streamed
    (indented), its stderr passes through to a terminal (the progress bar) and otherwise is only
    kept, so a failure can quote its last line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    if code != ROOT:  # ahead of this checkout's (an editable install or PYTHONPATH)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    tee, tail = sys.stderr.isatty(), bytearray()

    def pump() -> None:
        while chunk := proc.stderr.read1(4096):
            if tee:
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
            tail.extend(chunk)
            del tail[:-8192]

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    for line in proc.stdout:
        print("  " + line.decode(errors="replace").rstrip(), flush=True)
    code = proc.wait()
    thread.join()
    if code != 0:
        lines = [s.strip() for s in tail.decode(errors="replace").replace("\r", "\n").splitlines() if s.strip()]
        last = lines[-1].removeprefix("error: ") if lines else "no message"
        raise UserError(f"{what} failed (exit status {code}): {last}")


def preset_files(args: argparse.Namespace) -> list[str]:
    """--preset's and --data_from's files where they lie in this checkout (relative to it): training
    code of the run, wherever they are (a preset may be a TOML file outside configs/)."""
    paths = [resolve_preset(args.preset).resolve()] + ([resolve_preset(args.data_from, "--data_from").resolve()]
                                                       if args.data_from else [])
    return [p.relative_to(ROOT).as_posix() for p in paths if p.is_relative_to(ROOT)]


@contextmanager
def training_code(args: argparse.Namespace) -> Iterator[tuple[Path, str]]:
    """(the checkout new runs train with, why): a temporary git worktree of this checkout's commit,
    so that an edit made while they run reaches none of them; a checkout with uncommitted changes
    to training code or to the run's preset files as it is (its record says dirty). Records written
    since the commit, docs and other files that train nothing leave the runs on the commit, recorded clean."""
    commit, dirty = git_state(ROOT)
    if commit is None:
        yield ROOT, "this checkout as it is (not a git checkout: the record names no commit)"
        return
    if changed := uncommitted_training_changes(ROOT, preset_files(args)):
        yield ROOT, f"this checkout as it is ({changed[0]} is not committed: the record says dirty)"
        return
    with commit_worktree(ROOT, commit) as code:
        yield code, (f"{commit[:12]}, this checkout's commit, checked out at {code}"
                     + (" (the uncommitted changes here train nothing)" if dirty else ""))


def speedrun(args: argparse.Namespace) -> None:
    """Train args.runs seeded runs of a new setup and record them."""
    with training_code(args) as (code, why):
        print(f"training code: {why}", flush=True)
        train_and_record(args, code, prepare(args, code))


def extend(args: argparse.Namespace) -> None:
    """--extend RECORD [RECORD ...]: args.runs more seeds of each record, in turn, each trained in a
    worktree of its commit into a new record that holds its runs too. Every record's refusals come
    before anything trains; several end side by side, as --candidate's table (a queue of extensions
    that was a hand-written shell loop before)."""
    if len(set(args.extend)) < len(args.extend):
        raise UserError("--extend: a record is given twice")
    named = [(name, load_record(name)) for name in args.extend]
    extended = {rec.get("extends"): n for rec, n in read_records(Path(args.records_dir))[0]}
    with ExitStack() as stack:
        jobs = []
        for name, rec in named:
            if by := extended.get(Path(name).name):
                raise UserError(f"cannot extend {name}: {by} extends it already; extend that one")
            plan = extension_plan(name, rec, ROOT)
            one = argparse.Namespace(**{**vars(args), "preset": plan["preset"], "budget": str(plan["budget"]),
                                        "overrides": plan["overrides"], "data_from": plan["data_from"],
                                        "label": plan["label"], "seed0": plan["seed0"]})
            code = stack.enter_context(commit_worktree(ROOT, plan["commit"]))
            where = plan["elsewhere"] or "the same training code as this checkout"
            why = f"{plan['commit'][:12]}, the record's commit ({where}), checked out at {code}"
            jobs.append((one, code, prepare(one, code, (name, rec)), why))
        done = []
        for i, ((name, rec), (one, code, prepared, why)) in enumerate(zip(named, jobs)):
            if len(named) > 1:
                print(f"\n=== {i + 1}/{len(named)}: extending {name}", flush=True)
            print(f"training code: {why}", flush=True)
            done.append(train_and_record(one, code, prepared, (name, rec)))
    if len(done) > 1:
        print()
        side_by_side([(str(path), rec) for path, rec in done], args.compare, jobs[0][2]["baseline"])


def sweep(args: argparse.Namespace) -> None:
    """--sweep KEY=V1,V2,... or --variant NAME: OVERRIDES (repeated): one speedrun (its own record,
    tested against --compare) per value or variant, on the same seeds and the same code, every one's
    refusals before anything trains; then side by side, as a table and a picture."""
    started = datetime.now().astimezone()
    if args.sweep:
        key, values = parse_sweep(args.sweep, args.overrides)
        items = [(value, [f"{key}={value}"]) for value in values]
        labels = [f"{args.label}_{derive_label(one)}" if args.label else derive_label([*args.overrides, *one], args.data_from)
                  for _, one in items]
        title, picture = f"sweep of {key} over {', '.join(values)}", f"sweep-{key.split('.')[-1]}"
    else:
        items = parse_variants(args.variant, args.overrides)
        key, values = "variant", [name for name, _ in items]
        prefix = args.label or (derive_label(args.overrides, args.data_from) if args.overrides or args.data_from else "")
        labels = [f"{prefix}_{name}" if prefix else name for name in values]
        title, picture = f"variants {', '.join(values)}", f"variants-{prefix or values[0]}"
    if reserved := [o for _, ones in items for o in ones if o.partition("=")[0].strip() in RESERVED]:
        raise UserError(f"{reserved[0].partition('=')[0]} is set by the harness; use --seed0 / --budget")
    variants = [argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, *ones], "label": label})
                for (_, ones), label in zip(items, labels)]
    with training_code(args) as (code, why):
        print(f"training code: {why}\n{title}: {len(values)} speedruns of "
              f"{args.runs} run{'s' if args.runs > 1 else ''} each", flush=True)
        plans = [prepare(a, code) for a in variants]
        if len({plan["label"] for plan in plans}) < len(plans):
            raise UserError("two values give one label (a long one is cut); use shorter values or names")
        done = []
        for i, (a, plan) in enumerate(zip(variants, plans)):
            print(f"\n=== {i + 1}/{len(values)}: {' '.join(items[i][1])}", flush=True)
            done.append(train_and_record(a, code, plan))
    baseline = (args.compare, plans[0]["baseline"]) if args.compare else None  # prepare loaded it
    records = [rec for _, rec in done]
    print("\n" + "\n".join(sweep_lines(key, values, records, baseline, variants=not args.sweep)))
    out = plans[0]["records"] / (f"{plans[0]['preset']}-{format_budget(plans[0]['budget'])}-{picture}-"
                                 f"{started:%Y%m%d-%H%M%S}.png")
    print(f"{'sweep' if args.sweep else 'variants'} picture: {plot_sweep(key, values, records, out, baseline)}")


def prepare(args: argparse.Namespace, code: Path, extending: tuple[str, dict] | None = None) -> dict:
    """Everything that can refuse a speedrun, before it trains: its preset and data in the checkout
    `code`, its overrides (a new run's), its label, the baseline it will be compared with, the
    records folder. Returns what training it needs."""
    def in_code(path: Path) -> Path:
        path = path.resolve()
        return code / path.relative_to(ROOT) if path.is_relative_to(ROOT) else path

    try:
        config = in_code(resolve_preset(args.preset))
        if not config.is_file():
            raise UserError(f"--preset {args.preset!r}: not in the commit's configs")
    except UserError:
        if extending is None:
            raise
        raise UserError(f"cannot extend {extending[0]}: its preset {args.preset!r} is not an LLM preset here") from None
    budget = parse_budget(args.budget)
    if args.runs < 1:
        raise UserError(f"--runs must be at least 1, got {args.runs}")
    if bad := [o for o in args.overrides if o.split("=", 1)[0].strip() in RESERVED]:
        raise UserError(f"override {bad[0]!r} is set by the harness: use --seed0 / --budget instead")
    data_from = in_code(resolve_preset(args.data_from, "--data_from")) if args.data_from else None
    if extending is None:  # an extension's overrides were the record's own, at its commit
        check_config(config, data_from, args.overrides)
    label = check_label(args.label or derive_label(args.overrides, args.data_from))
    records = Path(args.records_dir)
    baseline = None
    if args.compare:  # everything that can refuse the comparison does so before hours of training
        baseline = load_record(args.compare)  # (fewer than 2 runs a side: a screen, not a test)
        check_comparable(baseline, config.stem, budget, args.compare, planned_data(config, data_from, args.overrides))
    check_writable(records, "records folder")
    return {"config": config, "preset": config.stem, "budget": budget, "data_from": data_from, "label": label,
            "records": records, "baseline": baseline}


def train_and_record(args: argparse.Namespace, code: Path, plan: dict,
                     extending: tuple[str, dict] | None = None) -> tuple[Path, dict]:
    """The speedrun `prepare` planned, its runs trained by the checkout `code` (ROOT, or a worktree of
    a commit: its presets, its train_llm.py, its packages); returns its record and where it is."""
    config, preset, budget, data_from, label = (plan[k] for k in ("config", "preset", "budget", "data_from", "label"))
    records, baseline = plan["records"], plan["baseline"]
    commit, dirty = git_state(code)  # the code that trains, before a record makes the tree dirty
    created = datetime.now().astimezone()
    first = Path(args.runs_dir) / "speedrun" / f"{preset}-{format_budget(budget)}-{label}-{created:%Y%m%d-%H%M%S}"
    group, i = first, 1
    while group.exists():  # train_llm refuses an existing run folder: never reuse one
        i += 1
        group = first.with_name(f"{first.name}-{i}")
    print(f"speedrun: {preset}{f' on the data of {data_from.stem}' if data_from else ''} at {budget:,} tokens, "
          f"label {label}, {args.runs} run{'s' if args.runs != 1 else ''}, "
          f"seeds {args.seed0}..{args.seed0 + args.runs - 1}, run folders under {group}"
          + (f", extending {Path(extending[0]).name}" if extending else ""), flush=True)
    def record_of(results: list[dict]) -> dict:
        record = build_record(label=label, preset=preset, budget=budget, overrides=args.overrides, runs=results,
                              commit=commit, dirty=dirty, created=created,
                              data_from=data_from.stem if data_from else None)
        return merged_record(extending[1], record, extending[0]) if extending is not None else record

    results, path, env = [], None, older_code_env(code)
    if env:
        print(f"the training code predates shared/cpumem.py: its runs keep freed memory by GLIBC_TUNABLES="
              f"{env['GLIBC_TUNABLES']} ({SWITCH}=0 turns it off)", flush=True)
    for k in range(args.runs):
        seed = args.seed0 + k
        print(f"run {k + 1}/{args.runs}: seed {seed} -> {group / f'seed{seed}'}", flush=True)
        train_one([sys.executable, str(code / "scripts" / "train_llm.py"), "--config", str(config),
                   *(["--data_from", str(data_from)] if data_from else []),
                   "--experiment_name", f"seed{seed}", "--runs_dir", str(group), "--train_tokens", str(budget),
                   f"train.seed={seed}", *args.overrides], f"training run {k + 1}/{args.runs} (seed {seed})", code, env)
        results.append(read_run(group / f"seed{seed}", seed, f"speedrun/{group.name}/seed{seed}"))
        if extending is not None:  # the same setup as the record's runs, or stop before training more
            check_same_setup(extending[1], results[-1], extending[0])
        if k < args.runs - 1:  # a stop from here on keeps the seeds trained so far, as a record --extend continues
            path = write_record(record_of(results), records, created, replace=path)
            write_leaderboard(records)
            print(f"record so far ({k + 1} of {args.runs} runs): {path}", flush=True)

    print(f"\n{preset} at {budget:,} tokens, {label}:")
    record = record_of(results)
    return publish(record, args, baseline, records, created, replace=path), record


def publish(record: dict, args: argparse.Namespace, baseline: dict | None, records: Path, created: datetime,
            replace: Path | None = None) -> Path:
    """Print a record's figures (and its test against the baseline), write it (over `replace`, the same
    speedrun's record so far), its picture and the leaderboard."""
    print("\n".join(summary_lines(record)))
    if baseline is not None:
        key, result, lines = judge(baseline, record, args.compare, args.confidence / 100)
        record[key] = result
        print("\n" + "\n".join(lines))
    path = write_record(record, records, created, replace)
    sides = [(args.compare, baseline)] if baseline is not None else []
    png = plot_records([*sides, (path.name, record)], path.with_suffix(".png"), **picture_title(record))
    print(f"\nrecord: {path}\npicture: {png}\nleaderboard: {write_leaderboard(records)}")
    return path


def merge(args: argparse.Namespace) -> None:
    record = merge_records([(name, load_record(name)) for name in args.merge], ROOT)
    created = datetime.now().astimezone()
    record["created"] = created.isoformat(timespec="seconds")
    records = Path(args.records_dir)
    check_writable(records, "records folder")
    publish(record, args, load_record(args.compare) if args.compare else None, records, created)


def candidates(args: argparse.Namespace, base: dict) -> None:
    """--compare BASE --candidate ...: one record's test (or screen) and picture; several records side
    by side (each one's against the baseline, the best's against the others), as a --variant table."""
    if len(set(args.candidate)) < len(args.candidate):
        raise UserError("--candidate: a record is given twice")
    named = [(name, load_record(name)) for name in args.candidate]
    if len(named) == 1:
        (name, new), = named
        key, result, lines = judge(base, new, args.compare, args.confidence / 100, "candidate")
        print("\n".join(lines))
        out = Path(name).with_name(f"{Path(name).stem}-vs-{Path(args.compare).stem}.png")
        print(f"picture: {plot_records([(args.compare, base), (name, new)], out, **picture_title({key: result}))}")
        return
    for name, new in named:
        check_comparable(base, new["preset"], new["budget"], args.compare, record_data(new))
    side_by_side(named, args.compare, base)


def side_by_side(named: list[tuple[str, dict]], base_name: str | None, base: dict | None) -> None:
    """Several records as --variant's table (each one's loss, the best's tests against the others,
    each one's against the baseline when there is one) and its picture, beside the first record."""
    labels = [rec["label"] for _, rec in named]
    values = labels if len(set(labels)) == len(labels) else [Path(name).stem for name, _ in named]
    records, baseline = [rec for _, rec in named], (base_name, base) if base is not None else None
    print("\n".join(sweep_lines("record", values, records, baseline, variants=True)))
    stem = Path(base_name).stem if base_name else Path(named[0][0]).stem
    out = Path(named[0][0]).with_name(f"{stem}-vs-{len(named)}-records.png")
    print(f"picture: {plot_sweep('record', values, records, out, baseline)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="a name in configs/llm/ (debug, blueberry-88m, 5dollar-88m, ...) or a .toml path")
    p.add_argument("--budget", help="training tokens per run: 8M, 20M, 100M, 1B, 500k, 2048, ...")
    p.add_argument("--runs", type=int, default=4, help="runs with seeds seed0, seed0+1, ... (default 4)")
    p.add_argument("--seed0", type=int, help="seed of the first run (default 0; --extend: the record's next)")
    p.add_argument("--label", help="names the record (default: baseline, or derived from the overrides)")
    p.add_argument("--data_from", metavar="PRESET", help="train on another preset's data (its [data] table), e.g. "
                   "--preset blueberry-88m --data_from 5dollar-88m: Blueberry's recipe on 5-dollar-llm's benchmark")
    p.add_argument("--runs_dir", default="runs", help="run folders go to <runs_dir>/speedrun/<record name>/seed<k>")
    p.add_argument("--records_dir", default=str(ROOT / "benchmarks" / "records"), help="default: benchmarks/records")
    p.add_argument("--compare", metavar="RECORD", help="baseline record to test the new runs (or --candidate) against "
                   "(under 2 runs on either side: a screen, no test)")
    p.add_argument("--extend", metavar="RECORD", nargs="+", help="--runs more seeds of a record (its preset, budget, "
                   "overrides and data, trained by its commit's code in a temporary git worktree of that commit): the "
                   "new record holds all of its runs; several records: one after another, then side by side")
    p.add_argument("--candidate", metavar="RECORD", nargs="+", help="with --compare: compare existing records with "
                   "the baseline, train nothing; two or more: side by side, as --variant's table and picture")
    p.add_argument("--merge", metavar="RECORD", nargs="+", help="write one record of these records' seeds (one setup, "
                   "one training code, distinct seeds), train nothing; with --compare, test it")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...", help="one speedrun (one record, --runs seeds) per value of "
                   "one config key, e.g. optim.muon_lr=0.01,0.02,0.04, the same seeds and code for each; then the "
                   "values side by side (which the best beats, each against --compare) and a picture")
    p.add_argument("--variant", metavar="'NAME: KEY=V ...'", action="append", help="repeated: one speedrun per "
                   "named set of overrides, e.g. an ablation of the default, --variant 'no-smear: model.smear=false' "
                   "--variant 'no-softcap: model.logit_softcap=0'; the same seeds and code for each, then side by "
                   "side as for --sweep")
    p.add_argument("--confidence", type=finite_float, default=95.0, help="level of the difference's interval, in percent")
    p.add_argument("--leaderboard", action="store_true", help="only regenerate LEADERBOARD.md from the records")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")
    args = p.parse_intermixed_args()  # overrides may come before or after the flags
    if not 0 < args.confidence < 100:
        raise UserError(f"--confidence is a percentage in (0, 100), got {args.confidence:g}")
    training = [f for f in ("preset", "budget", "data_from", "sweep", "variant") if getattr(args, f)] + (["overrides"] if args.overrides else [])
    if args.leaderboard:
        if training or args.compare or args.candidate or args.extend or args.merge:
            raise UserError("--leaderboard only regenerates the leaderboard: give it no other work")
        records = Path(args.records_dir)
        check_writable(records, "records folder")
        for rec, name in read_records(records)[0]:  # a picture beside every record that lacks one
            if not (png := (records / name).with_suffix(".png")).is_file():
                print(f"drew {plot_records([(name, rec)], png)}")
        print(f"wrote {write_leaderboard(records)}")
    elif args.merge:
        if training or args.candidate or args.extend or args.label or args.seed0 is not None:
            raise UserError("--merge writes one record of existing records and trains nothing: give it only the records "
                            "(and --compare, --records_dir)")
        merge(args)
    elif args.candidate:
        if not args.compare:
            raise UserError("--candidate needs --compare BASELINE")
        if training or args.extend:
            raise UserError("--compare with --candidate compares two records and trains nothing: drop "
                            + ", ".join(training + (["extend"] if args.extend else [])))
        candidates(args, load_record(args.compare))
    elif args.extend:
        if training or args.label or args.seed0 is not None:
            raise UserError("--extend takes the preset, budget, overrides, data, label and seeds from the record: "
                            "give it only --runs (and --compare, --runs_dir, --records_dir)")
        extend(args)
    elif args.preset and args.budget:
        args.seed0 = args.seed0 or 0
        if args.sweep and args.variant:
            raise UserError("--sweep and --variant are two ways to name the runs: give one")
        if args.sweep or args.variant:
            sweep(args)
        else:
            speedrun(args)
    else:
        raise UserError("give --preset and --budget to train (or --compare BASE --candidate NEW, or --leaderboard)")


if __name__ == "__main__":
    run_main(main)
