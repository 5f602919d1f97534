"""A screen: a speedrun too small for a test (one run a side, the usual first look at an option)
set beside a baseline record. It gives no p value; it says what a researcher otherwise works out
by hand: the run's loss against the baseline's on the same seed (a seed fixes the batches and,
for one shape, the init) and where it lies in the baseline's spread over its seeds. Its use is to
choose what to --extend to three or more seeds, where the test decides."""

from __future__ import annotations

from pathlib import Path

from shared.stats import mean_std

from .speedrun import check_comparable, compare, comparison_lines, record_data


def screen(base: dict, new: dict, base_name: str) -> dict:
    """The screen of record `new` against `base` (same budget and data, as for a test). `position`
    places new's mean in base's range over its runs; None when base has one run (no range)."""
    check_comparable(base, new["preset"], new["budget"], base_name, record_data(new))
    base_runs, new_runs = [r["loss"] for r in base["runs"]], [r["loss"] for r in new["runs"]]
    base_mean, base_sd = mean_std(base_runs)
    new_mean, _ = mean_std(new_runs)
    low, high = min(base_runs), max(base_runs)
    position = None if len(base_runs) < 2 else "below" if new_mean < low else "above" if new_mean > high else "inside"
    out = {"baseline": Path(base_name).name, "baseline_label": base["label"], "baseline_preset": base["preset"],
           "test": "none: a screen (a test needs 2 or more runs on each side)",
           "n_base": len(base_runs), "n_new": len(new_runs), "mean_base": base_mean, "sd_base": base_sd,
           "range_base": [low, high], "mean_new": new_mean, "diff": new_mean - base_mean, "position": position}
    base_loss = {r["seed"]: r["loss"] for r in base["runs"]}
    if diffs := [r["loss"] - base_loss[r["seed"]] for r in new["runs"] if r["seed"] in base_loss]:
        out["same_seeds"] = {"seeds": sorted(r["seed"] for r in new["runs"] if r["seed"] in base_loss),
                             "diff": sum(diffs) / len(diffs)}
    return out


def screen_lines(s: dict) -> list[str]:
    spread = f" ± {s['sd_base']:.4f}" if s["sd_base"] is not None else ""
    this = "this run" if s["n_new"] == 1 else f"this record's mean (n={s['n_new']})"
    lines = [f"screened against {s['baseline']} ({s['baseline_label']}): no test, a screen "
             f"({s['n_new']} run{'s' if s['n_new'] > 1 else ''} here, {s['n_base']} there; a test needs 2 or more "
             "on each side)",
             f"  baseline {s['mean_base']:.4f}{spread} (n={s['n_base']}"
             + (f", range {s['range_base'][0]:.4f} to {s['range_base'][1]:.4f}" if s["n_base"] > 1 else "")
             + f"); {this} {s['mean_new']:.4f}, difference {s['diff']:+.4f}"]
    if same := s.get("same_seeds"):
        which = ", ".join(map(str, same["seeds"]))
        lines.append(f"  on the same seed{'s' if len(same['seeds']) > 1 else ''} ({which}): difference {same['diff']:+.4f}")
    if s["position"] is None:
        lines.append("  the baseline has one run, so no range to place this in: --extend the baseline for one; "
                     "a screen decides nothing")
        return lines
    where = {"below": "below the baseline's whole range", "above": "above the baseline's whole range",
             "inside": "inside the baseline's range"}[s["position"]]
    more = "--extend it to 3 or more runs for a test" if s["n_new"] < 2 else "--extend the baseline for a test"
    advice = {"below": f"a candidate: {more}", "inside": "within the baseline's seed-to-seed spread",
              "above": "above every baseline run"}[s["position"]]
    lines.append(f"  {this} is {where}: {advice}; a screen decides nothing")
    return lines


def screen_title(s: dict) -> str:
    """The screen in a few words, for a picture's title."""
    where = "one baseline run" if s["position"] is None else f"{s['position']} the baseline's range"
    same = f", same seeds {s['same_seeds']['diff']:+.4f}" if s.get("same_seeds") else ""
    return f"screen, no test: {where}{same}"


def picture_title(record: dict) -> dict:
    """plot_records' keywords for a record's test (the verdict) or screen (its words)."""
    return {"title": screen_title(record["screen"])} if "screen" in record else {"comparison": record.get("comparison")}


def judge(base: dict, new: dict, base_name: str, confidence: float = 0.95,
          new_name: str = "new") -> tuple[str, dict, list[str]]:
    """(the record's key, the result, its lines): Welch's test where both records have 2 or more
    runs ("comparison"), else a screen ("screen")."""
    if min(len(base["runs"]), len(new["runs"])) >= 2:
        result = compare(base, new, base_name, confidence)
        return "comparison", result, comparison_lines(result, new_name)
    result = screen(base, new, base_name)
    return "screen", result, screen_lines(result)
