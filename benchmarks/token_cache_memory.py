"""Peak memory of building a token cache: it should not grow with the corpus.

Makes a corpus by repeating a folder of text (each copy's documents made distinct by a copy
number) as .jsonl files, tokenises it into a fresh cache, and prints one JSON object: corpus
size, tokens written, seconds, and the process's peak resident memory.

    python benchmarks/token_cache_memory.py --text $BLUEBERRY_DATA_DIR/text \\
        --tokenizer $BLUEBERRY_DATA_DIR/tokenizers/gpt2 --repeat 100 --work /tmp/cache-mem
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from llm.data import TextDataConfig, prepare_data
from shared.errors import UserError, run_main


def make_corpus(text: Path, repeat: int, out: Path) -> int:
    """`repeat` .jsonl files, each every .txt document under `text` with its copy number in front."""
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(text.rglob("*.txt"))]
    if not docs:
        raise UserError(f"no .txt files under {text}")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(repeat):
        with open(out / f"copy{i:05d}.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps({"text": f"Copy {i}.\n{d}"}) + "\n")
    return sum(p.stat().st_size for p in out.iterdir())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", required=True, help="a folder of .txt documents to repeat")
    p.add_argument("--tokenizer", required=True, help="a tokenizer spec (a folder, tokenizer.json or Hub name)")
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--work", required=True, help="scratch folder for the corpus and the cache (emptied first)")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    corpus_bytes = make_corpus(Path(args.text), args.repeat, work / "corpus")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = TextDataConfig(source=str(work / "corpus"), tokenizer=args.tokenizer, val_fraction=0.01,
                         val_tokens=1_048_576, cache_dir=str(work / "tokens"))
    t0 = time.perf_counter()
    cache = prepare_data(cfg)
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "corpus_mib": round(corpus_bytes / 2**20, 1), "files": args.repeat,
        "train_tokens": cache.meta["train_tokens"], "val_tokens": cache.meta["val_tokens"],
        "seconds": round(seconds, 1), "mib_per_s": round(corpus_bytes / 2**20 / seconds, 2),
        "peak_rss_mib_before_build": round(rss_before / 1024, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, indent=2))


if __name__ == "__main__":
    run_main(main)
