"""Zero-shot multiple-choice evaluation of a trained Blueberry run: HellaSwag, ARC, PIQA, ... or local files.

    python scripts/evaluate_llm.py --checkpoint runs/blueberry-88m --tasks hellaswag,arc_easy,arc_challenge,piqa
    python scripts/evaluate_llm.py --checkpoint runs/debug --tasks sums=sums.jsonl --limit 200
    python scripts/evaluate_llm.py --checkpoint runs/blueberry-88m --tasks hellaswag=/data/hellaswag-validation.parquet

Each choice is scored by its log-likelihood given the context (acc) and per character (acc_norm),
as lm-evaluation-harness scores them; accuracy comes with a 95% Wilson interval and the random
baseline, and a CORE-style score centred on chance sums up the tasks. Known names are read from
the Hugging Face Hub; NAME=PATH reads a .jsonl or .parquet file with rows
{"context": "...", "choices": ["...", "..."], "label": 0} (or a local copy of a known task's Hub rows).
Details: llm/downstream.py. Results are printed and written as JSON to RUN/eval/downstream.json
(downstream-limitN.json with --limit), or to --output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from llm.downstream import TASKS, evaluate, load_task, parse_tasks, report_lines, task_table
from llm.load import load_llm_run
from shared.checkpoint import resolve_checkpoint
from shared.errors import UserError, run_main
from shared.run import check_output, find_run_dir, non_negative_int
from shared.trainer import pick_device, pick_dtype


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, epilog=task_table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated known names and NAME=PATH local files "
                   "(default: every known task)")
    p.add_argument("--limit", type=non_negative_int, default=0, help="only the first N items of each task (0 = all)")
    p.add_argument("--batch_size", type=int, default=32, help="choices scored per forward pass")
    p.add_argument("--no_ema", action="store_true", help="the trained weights instead of their EMA (default: EMA when the run kept it)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on a GPU that has it, fp32 on a CPU")
    p.add_argument("--output", help="where the JSON goes (default RUN/eval/downstream.json)")
    args = p.parse_args()
    if args.batch_size < 1:
        raise UserError("--batch_size must be positive")

    specs = parse_tasks(args.tasks)
    run_dir = find_run_dir(resolve_checkpoint(args.checkpoint))
    default = run_dir / "eval" / (f"downstream-limit{args.limit}.json" if args.limit else "downstream.json")
    output = check_output(args.output or default, folder=False)  # before any work
    tasks = [load_task(s, args.limit) for s in specs]  # every task file and download checked before scoring

    run = load_llm_run(args.checkpoint, use_ema=not args.no_ema)
    device = pick_device(args.device)
    model = run.model.to(device)
    dtype = pick_dtype(args.precision, device)
    print(f"# {run.ckpt} ({'EMA' if run.ema else 'trained'} weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, context {model.max_seq_len} tokens, {device}, {str(dtype).removeprefix('torch.')}"
          f"{run.tokenizer_note})", file=sys.stderr)
    scores = evaluate(model, run.tokenizer, tasks, args.batch_size, dtype)
    result = {"checkpoint": str(run.ckpt), "ema": run.ema, "device": str(device), "precision": str(dtype).removeprefix("torch."),
              "limit": args.limit or None, **scores}
    for line in report_lines(result):
        print(line)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    run_main(main)
