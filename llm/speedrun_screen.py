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
    """The screen of record `new` against `base` (same budget and data, as for a test)."""
    check_comparable(base, new["preset"], new["budget"], base_name, record_data(new))
    base_loss, new_loss = ({r["seed"]: r["loss"] for r in rec["runs"]} for rec in (base, new))
    seeds = sorted(set(base_loss) & set(new_loss))
    base_mean, base_sd = mean_std(list(base_loss.values()))
    new_mean, _ = mean_std(list(new_loss.values()))
    low, high = min(base_loss.values()), max(base_loss.values())
    out = {"baseline": Path(base_name).name, "baseline_label": base["label"],
           "test": "none: a screen (a test needs 2 or more runs a side)",
           "n_base": len(base_loss), "n_new": len(new_loss), "mean_base": base_mean, "sd_base": base_sd,
           "range_base": [low, high], "mean_new": new_mean, "diff": new_mean - base_mean,
           "position": "below" if new_mean < low else "above" if new_mean > high else "inside"}
    if seeds:
        diffs = [new_loss[s] - base_loss[s] for s in seeds]
        out["same_seeds"] = {"seeds": seeds, "diff": sum(diffs) / len(diffs)}
    return out


def screen_lines(s: dict) -> list[str]:
    spread = f" ± {s['sd_base']:.4f}" if s["sd_base"] is not None else ""
    lines = [f"screened against {s['baseline']} ({s['baseline_label']}): no test, a screen "
             f"({s['n_new']} run{'s' if s['n_new'] > 1 else ''} here, {s['n_base']} there; a test needs 2 or more a side)",
             f"  baseline {s['mean_base']:.4f}{spread} (n={s['n_base']}, range {s['range_base'][0]:.4f} to "
             f"{s['range_base'][1]:.4f}); this {s['mean_new']:.4f}, difference {s['diff']:+.4f}"]
    if same := s.get("same_seeds"):
        which = ", ".join(map(str, same["seeds"]))
        lines.append(f"  on the same seed{'s' if len(same['seeds']) > 1 else ''} ({which}): difference {same['diff']:+.4f}")
    where = {"below": "below the baseline's whole range", "above": "above the baseline's whole range",
             "inside": "inside the baseline's range"}[s["position"]]
    advice = "a candidate to --extend to 3 or more seeds" if s["position"] == "below" else \
        "nothing to extend unless another reason says so" if s["position"] == "inside" else "worse at this seed"
    lines.append(f"  {where}: {advice}; a screen decides nothing")
    return lines


def judge(base: dict, new: dict, base_name: str, confidence: float = 0.95,
          new_name: str = "new") -> tuple[str, dict, list[str]]:
    """(the record's key, the result, its lines): Welch's test where both records have 2 or more
    runs ("comparison"), else a screen ("screen")."""
    if min(len(base["runs"]), len(new["runs"])) >= 2:
        result = compare(base, new, base_name, confidence)
        return "comparison", result, comparison_lines(result, new_name)
    result = screen(base, new, base_name)
    return "screen", result, screen_lines(result)
