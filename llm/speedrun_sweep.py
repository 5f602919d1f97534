"""A sweep over one config value, or a set of named variants (an ablation: the default with one
piece removed at a time): one speedrun record each, all trained on the same seeds by the same code,
then side by side: each one's loss, the best, which the best beats (Welch's test, and the paired
test over the shared seeds), and each against a baseline record when one is given. The best is
chosen by its mean and a variant may land on either side of the baseline, so the tests are
two-sided, and each column is one family: its p values are Holm-adjusted (a verdict holds for the
whole table)."""

from __future__ import annotations

import re
import shlex

from shared.errors import UserError
from shared.stats import holm, paired_less, two_sided, welch_less

from .speedrun import ALPHA, _p, _pm, summarise, time_mark


def parse_sweep(text: str, overrides: list[str]) -> tuple[str, list[str]]:
    """`section.key=v1,v2,...` as (key, values): two or more distinct values, none empty, and a key
    that no override also sets. Values are split at commas, so a list value cannot be swept."""
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise UserError(f"--sweep {text!r}: give section.key=v1,v2,... (e.g. optim.muon_lr=0.01,0.02,0.04)")
    values = [v.strip() for v in rest.split(",")]
    if any(not v for v in values):
        raise UserError(f"--sweep {text!r}: an empty value (values are separated by commas)")
    if len(values) < 2:
        raise UserError(f"--sweep {text!r}: a sweep needs two or more values")
    if len(set(values)) < len(values):
        raise UserError(f"--sweep {text!r}: a value is given twice")
    if any(o.partition("=")[0].strip() == key for o in overrides):
        raise UserError(f"--sweep sets {key}: drop the override that also sets it")
    return key, values


def parse_variants(texts: list[str], overrides: list[str]) -> list[tuple[str, list[str]]]:
    """`NAME: section.key=value ...` (shell-quoted, one or more overrides) as (name, overrides): two
    or more variants, distinct names that can name a file, no key set twice or also by an override."""
    out, common = [], {o.partition("=")[0].strip() for o in overrides}
    for text in texts:
        name, sep, rest = text.partition(":")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise UserError(f"--variant {text!r}: give NAME: section.key=value ... (a name of letters, digits, . _ -)")
        try:
            ones = shlex.split(rest)
        except ValueError as e:
            raise UserError(f"--variant {name}: {e}") from None
        keys = [o.partition("=")[0].strip() for o in ones]
        if not ones or any("=" not in o or "." not in k for o, k in zip(ones, keys)):
            raise UserError(f"--variant {name}: give one or more section.key=value overrides after the colon")
        if len(set(keys)) < len(keys):
            raise UserError(f"--variant {name}: a key is set twice")
        if both := sorted(common & set(keys)):
            raise UserError(f"--variant {name}: it and an override both set {both[0]}")
        out.append((name, ones))
    if len(out) < 2:
        raise UserError("--variant: give two or more variants (each one a record)")
    if len({n for n, _ in out}) < len(out):
        raise UserError("--variant: a name is given twice")
    return out


def _test(new: dict, base: dict) -> tuple[float | None, float | None]:
    """(Welch p, paired p) of record new's loss below base's; None where a side has fewer than 2 runs,
    or they share fewer than 2 seeds. Not llm.speedrun.compare: a sweep of a data key compares values
    trained on different data, which compare refuses."""
    new_loss, base_loss = ({r["seed"]: r["loss"] for r in rec["runs"]} for rec in (new, base))
    welch = welch_less(list(new_loss.values()), list(base_loss.values())).p if min(len(new_loss), len(base_loss)) >= 2 else None
    seeds = sorted(set(new_loss) & set(base_loss))
    paired = paired_less([new_loss[k] for k in seeds], [base_loss[k] for k in seeds]).p if len(seeds) >= 2 else None
    return welch, paired


def _shown_p(p: float | None) -> str:
    return "n/a" if p is None else _p(p)


def sweep_lines(key: str, values: list[str], records: list[dict], baseline: tuple[str, dict] | None = None,
                variants: bool = False) -> list[str]:
    """The sweep (or, with variants, the named variants; key is then the column's title) as an
    aligned table (one row each: its loss, its train time, the best one's tests against it, its own
    against the baseline) and the verdicts in words."""
    summaries = [summarise(rec["runs"]) for rec in records]
    means = [sm["loss"]["mean"] for sm in summaries]
    best = min(range(len(values)), key=means.__getitem__)
    header = [key, "val loss (mean ± sd, n)", "train time (s)", "best better: p", "paired p"]
    if baseline:
        header += ["vs baseline", "p", "same seeds"]
        base_mean = summarise(baseline[1]["runs"])["loss"]["mean"]
        base_loss = {r["seed"]: r["loss"] for r in baseline[1]["runs"]}
    tests = [(None, None) if i == best else _test(records[best], rec) for i, rec in enumerate(records)]
    welch = holm([None if w is None else two_sided(w) for w, _ in tests])
    paired = holm([None if p is None else two_sided(p) for _, p in tests])
    beaten = [v for v, p in zip(values, welch) if p is not None and p < ALPHA]
    p_base = holm([None if (p := _test(rec, baseline[1])[0]) is None else two_sided(p) for rec in records]) \
        if baseline else []
    better = [v for v, p, m in zip(values, p_base, means) if p is not None and p < ALPHA and m < base_mean]
    worse = [v for v, p, m in zip(values, p_base, means) if p is not None and p < ALPHA and m > base_mean]
    rows = [header]
    for i, (value, sm) in enumerate(zip(values, summaries)):
        row = [value + (" *" if i == best else ""), f"{_pm(sm['loss'], 4)} (n={sm['loss']['n']})",
               _pm(sm["train_time_s"], 1) + time_mark(records[i]), "(best)" if i == best else _shown_p(welch[i]),
               "" if i == best else _shown_p(paired[i])]
        if baseline:
            # the mean of the per-seed differences: what a one-seed screen has in place of a p value
            diffs = [r["loss"] - base_loss[r["seed"]] for r in records[i]["runs"] if r["seed"] in base_loss]
            row += [f"{means[i] - base_mean:+.4f}", _shown_p(p_base[i]),
                    f"{sum(diffs) / len(diffs):+.4f} ({len(diffs)})" if diffs else "n/a"]
        rows.append(row)
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    name = (lambda v: v) if variants else (lambda v: f"{key} = {v}")
    what, one = (f"{key}s", key) if variants else (f"values of {key}", "value")  # key: "variant", "record"
    lines = [f"{len(values)} {what} ({records[0]['preset']}, {records[0]['budget']:,} tokens; the best {one}'s loss "
             f"against each other's: Welch's p and the paired test's over the shared seeds, and each one's against "
             "the baseline, two-sided, each column Holm-adjusted" + ("; same seeds: the mean difference from the baseline "
             "on the seeds both ran (their count)" if baseline else "") + "):"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"best: {name(values[best])} (val loss {means[best]:.4f}); at p < {ALPHA:g} it beats "
                 + (", ".join(map(name, beaten)) if beaten else f"no other {one}"))
    if baseline:
        for word, which in (("below", better), ("above", worse)):
            lines.append(f"{word} the baseline {baseline[0]} at p < {ALPHA:g}: "
                         + (", ".join(map(name, which)) if which else "none"))
    return lines
