"""Write a pre-tokenised dataset in 5-dollar-llm's layout (rows of token ids, {"input_ids",
"labels"}, shuffled with seed 42) from any text source: an offline stand-in for their
vukrosic/blueberry-1B-pretrain, trained on with --data OUT.

    python scripts/pretokenize.py --data "$BLUEBERRY_DATA_DIR/text" --tokenizer "$BLUEBERRY_DATA_DIR/tokenizers/gpt2" \\
        --row_len 2048 --out data_cache/text-rows-2048
    python scripts/pretokenize.py --data builtin --tokenizer bpe:400 --row_len 33 --out data_cache/rows-33 --format disk
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from llm.pretokenized import write_rows_dataset
from shared.errors import run_main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a text data spec: builtin, hf:OWNER/NAME[:CONFIG] or a path")
    p.add_argument("--tokenizer", required=True, help="Hub name, tokenizer.json, vocab.json+merges.txt folder, or bpe:N")
    p.add_argument("--row_len", type=int, default=2048, help="ids per row (5-dollar-llm: 2048)")
    p.add_argument("--out", required=True, help="a new folder for the dataset")
    p.add_argument("--format", default="parquet", choices=("parquet", "disk"),
                   help="rows.parquet, or a datasets save_to_disk folder (needs datasets)")
    p.add_argument("--text_field", default="text", help="the text field of .jsonl / .parquet / Hub rows")
    p.add_argument("--seed", type=int, default=42, help="the shuffle's seed (5-dollar-llm: 42)")
    args = p.parse_args()
    write_rows_dataset(args.data, args.tokenizer, args.row_len, Path(args.out), args.format, args.text_field, args.seed)


if __name__ == "__main__":
    run_main(main)
