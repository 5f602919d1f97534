"""Export a trained Blueberry run as a folder that Hugging Face `transformers` loads.

    python scripts/export_llm.py runs/blueberry-151m --out exports/blueberry-151m
    python scripts/export_llm.py runs/blueberry-88m --out exports/blueberry-88m --push_to_hub OWNER/blueberry-88m
    # then: AutoModelForCausalLM.from_pretrained("exports/blueberry-88m", trust_remote_code=True)

SwiGLU + QK-norm runs export as Qwen3 and SwiGLU without QK-norm as Llama (standard transformers
code); squared ReLU (blueberry-88m, debug) and the architecture options export as
BlueberryForCausalLM, whose code is written into the folder (load it with trust_remote_code=True).
Mixtures of experts are refused. Writes config.json, generation_config.json, model.safetensors
(fp32; the EMA weights when the run kept them, unless --no_ema), tokenizer.json,
tokenizer_config.json, the run's config (training_config.toml) and a model card (README.md) from
the run's summary. --push_to_hub then uploads the folder to a Hub model repository, created if
missing (log in first: `hf auth login`, or HF_TOKEN).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from llm.export import check_export_folder, check_repo_id, export_run, push_to_hub
from llm.load import load_llm_run
from shared.errors import UserError, run_main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="the folder to write (must be new or empty)")
    p.add_argument("--no_ema", action="store_true", help="export the trained weights instead of their EMA")
    p.add_argument("--push_to_hub", metavar="REPO", help="then upload the export to this Hub model repository "
                   "(OWNER/NAME; created if missing)")
    p.add_argument("--private", action="store_true", help="with --push_to_hub: a new repository is private")
    args = p.parse_args()
    if args.private and not args.push_to_hub:
        raise UserError("--private needs --push_to_hub REPO")
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
    out = check_export_folder(args.out)  # before any work
    run = load_llm_run(args.run, use_ema=not args.no_ema)
    command = shlex.join(["python", "scripts/export_llm.py", *sys.argv[1:]])
    export = export_run(run, out, command=command, name=args.push_to_hub or args.out)
    custom = " (custom code: load with trust_remote_code=True)" if export.architecture == "BlueberryForCausalLM" else ""
    print(f"exported {run.ckpt} ({'EMA' if run.ema else 'trained'} weights{run.tokenizer_note}) as "
          f"{export.architecture}{custom} to {out}", flush=True)
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub, private=args.private)}")


if __name__ == "__main__":
    run_main(main)
