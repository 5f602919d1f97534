"""Tokenizers: a Hub name, a local tokenizer.json, GPT-2 vocab.json + merges.txt, or a byte-level
BPE trained on the corpus (`bpe:<vocab size>`) and cached."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shared.cache import Stale, build_once
from shared.errors import UserError
from shared.hub import require_hub

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
OFFLINE_HINT = ("use a local tokenizer (a tokenizer.json file, or a folder with tokenizer.json or "
                "vocab.json + merges.txt) or train one on the corpus with --tokenizer bpe:8192")


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the end-of-document token and an identity fingerprint."""

    def __init__(self, tok: Tokenizer, spec: str):
        self.tok, self.spec = tok, spec
        vocab = tok.get_vocab()
        eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos is None:
            raise UserError(f"tokenizer {spec!r} has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")
        self.eos_token, self.eos_id = eos, vocab[eos]
        self.fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_batch_ids(self, texts: list[str]) -> list[list[int]]:
        """Ids only, without offsets or token strings: measured 1.3x faster and a third less memory."""
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def save(self, path: Path) -> None:
        self.tok.save(str(path))


def _gpt2_style(folder: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _trained_bpe(spec: str, size: int, train_texts: Callable[[], Iterable[str]], path: Path) -> TextTokenizer:
    """A BPE trained once per corpus and size: concurrent runs on the same data train it once."""
    def read() -> TextTokenizer | None:
        if not path.is_file():
            return None
        try:
            return TextTokenizer(Tokenizer.from_file(str(path)), spec)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file; ours, a UserError
            raise Stale(f"the cached BPE tokenizer {path} is unreadable ({' '.join(str(e).split())[:120]}): "
                        "training it again") from None

    def build(partial: Path) -> None:
        print(f"training a byte-level BPE tokenizer ({size} tokens) on the training documents...", flush=True)
        train_bpe(train_texts(), size).save(str(partial))

    return build_once(path, read, build, "the trained BPE tokenizer")


def load_tokenizer(spec: str, train_texts: Callable[[], Iterable[str]] | None = None,
                   cache_dir: Path | None = None, corpus_key: str = "") -> TextTokenizer:
    """Resolve a tokenizer spec. `bpe:N` trains on `train_texts()` once and caches the result
    under `cache_dir` keyed by `corpus_key` (the data's identity) and N."""
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            raise UserError(f"tokenizer {spec!r}: expected bpe:<vocab size>, e.g. bpe:8192") from None
        if size < 257:
            raise UserError(f"tokenizer {spec!r}: a byte-level BPE needs at least 257 tokens")
        if train_texts is None or cache_dir is None:
            raise UserError(f"tokenizer {spec!r} is trained on the corpus and needs the training data")
        return _trained_bpe(spec, size, train_texts, Path(cache_dir) / f"bpe{size}-{corpus_key}.json")
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return TextTokenizer(Tokenizer.from_file(str(path)), spec)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise UserError(f"tokenizer file {path} could not be read: {e}") from None
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return load_tokenizer(str(path / "tokenizer.json"))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return TextTokenizer(_gpt2_style(path), spec)
        raise UserError(f"tokenizer folder {path} has neither tokenizer.json nor vocab.json + merges.txt")
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise UserError(f"tokenizer {spec!r} is not a file, a folder or a Hub name (owner/name); {OFFLINE_HINT}")
    try:  # a tokenizer already in the Hugging Face cache loads without a network
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "tokenizer.json")
    except ImportError:
        cached = None
    if isinstance(cached, str):
        return TextTokenizer(Tokenizer.from_file(cached), spec)
    require_hub(f"tokenizer {spec!r}", OFFLINE_HINT)
    try:
        return TextTokenizer(Tokenizer.from_pretrained(spec), spec)
    except Exception as e:  # network errors surface as several exception types
        raise UserError(f"could not fetch tokenizer {spec!r} from the Hugging Face Hub "
                        f"({type(e).__name__}); offline? {OFFLINE_HINT}") from None
