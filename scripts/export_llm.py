"""Export a trained Blueberry run as a folder that Hugging Face `transformers` loads.

    python scripts/export_llm.py runs/blueberry-151m --out exports/blueberry-151m
    # then: AutoModelForCausalLM.from_pretrained("exports/blueberry-151m"), AutoTokenizer likewise

Writes config.json, model.safetensors (fp32; the EMA weights when the run kept them, unless
--no_ema), tokenizer.json and tokenizer_config.json. Runs whose MLP is squared ReLU (the 88M
preset, `debug`) have no standard architecture and are refused.
"""

from __future__ import annotations

import argparse
import json

from safetensors.torch import save_file

from llm.export import check_exportable, hf_config, hf_state_dict, tokenizer_config
from llm.load import load_llm_run
from shared.errors import UserError, run_main
from shared.run import check_output


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="the folder to write (must be new or empty)")
    p.add_argument("--no_ema", action="store_true", help="export the trained weights instead of their EMA")
    args = p.parse_args()
    out = check_output(args.out, folder=True)
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: choose a new folder for the export")
    run = load_llm_run(args.run, use_ema=not args.no_ema)
    check_exportable(run.model)
    config = hf_config(run.model, run.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(run.model), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    run.tokenizer.save(out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(run.model, run.tokenizer), indent=2) + "\n")
    print(f"exported {run.ckpt} ({'EMA' if run.ema else 'trained'} weights) as {config['architectures'][0]} to {out}")


if __name__ == "__main__":
    run_main(main)
