"""Downstream multiple-choice evaluation (llm/downstream.py, scripts/evaluate_llm.py) on task files the
tests write: nothing is downloaded."""

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import LLM_DEBUG as DEBUG, TINY_LLM, assert_one_line_error, run_script
from llm import downstream as ds
from llm.model import Decoder, DecoderConfig
from llm.tokenizer import TextTokenizer
from shared.errors import UserError

TINY = [*TINY_LLM, "train.budget=1024"]
EOS = "<|endoftext|>"


def word_tokenizer(words: list[str]) -> TextTokenizer:
    """One token per whitespace-separated word: token boundaries the tests can count."""
    vocab = {w: i for i, w in enumerate([EOS, "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TextTokenizer(tok, "words")


class Bigram(torch.nn.Module):
    """A stub language model with hand-set log-probabilities: log p(next | previous) = table[previous, next]
    (hidden = the one-hot previous token, the output layer = the table)."""

    def __init__(self, table: torch.Tensor, max_seq_len: int = 64):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.lm_head = torch.nn.Linear(table.shape[0], table.shape[0], bias=False)
        self.lm_head.weight.data = table.T.clone()

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        return F.one_hot(idx, self.lm_head.in_features).float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)


def bigram_table(tok: TextTokenizer, probs: dict[tuple[str, str], float]) -> torch.Tensor:
    """log p(next | previous): the given probabilities, the rest of each row spread evenly."""
    vocab, v = tok.tok.get_vocab(), tok.vocab_size
    p = torch.zeros(v, v, dtype=torch.float64)
    for (prev, nxt), value in probs.items():
        p[vocab[prev], vocab[nxt]] = value
    for row in p:
        free = row == 0
        row[free] = (1 - row.sum()) / free.sum()
    return p.log().float()


def test_sum_picks_the_wrong_choice_and_per_character_the_right_one():
    tok = word_tokenizer(["Q", "x", "yyyyyyyy", "a", "b"])
    model = Bigram(bigram_table(tok, {("Q", "x"): 0.2, ("Q", "yyyyyyyy"): 0.1, ("Q", "a"): 0.3, ("a", "b"): 0.5,
                                      (EOS, "x"): 0.4}))
    ex = ds.choice_example("Q", ["x", "yyyyyyyy"], label=1)
    requests, cut = ds.build_requests(tok, [ex], model.max_seq_len)
    assert cut == 0 and [r[1] for r in requests] == [1, 1]  # one scored token per choice, after <eos> Q
    assert requests[0][0][0] == tok.eos_id  # contexts start after end-of-text, as training documents do
    lp = ds.score_requests(model, requests)
    assert lp == pytest.approx([math.log(0.2), math.log(0.1)], abs=1e-5)
    # summed: x (-1.61) beats yyyyyyyy (-2.30); per character: -1.61 / 1 loses to -2.30 / 8 = -0.29
    assert ds.predictions(lp, ex.choices) == (0, 1)
    metrics = ds.task_metrics([ex], lp)
    assert metrics["acc"] == 0 and metrics["acc_norm"] == 1 and metrics["random_baseline"] == 0.5
    assert metrics["centered_acc"] == -1 and metrics["centered_acc_norm"] == 1

    # several scored tokens add up; an empty context scores the choice right after <eos>
    two = ds.score_requests(model, ds.build_requests(tok, [ds.choice_example("Q", ["a b", "x"], 0)], 64)[0])
    assert two[0] == pytest.approx(math.log(0.3) + math.log(0.5), abs=1e-5)
    empty = ds.score_requests(model, ds.build_requests(tok, [ds.choice_example("", ["x", "a"], 0)], 64)[0])
    assert empty[0] == pytest.approx(math.log(0.4), abs=1e-5)


def test_batched_scoring_equals_one_row_at_a_time_on_a_real_decoder():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden=64, vocab_size=64), 16)
    for p in model.parameters():  # zero-initialised projections would make every position alike
        p.data.normal_(0, 0.3)
    model.eval()
    g = torch.Generator().manual_seed(1)
    requests = [(torch.randint(0, 64, (length,), generator=g).tolist(), n)
                for length, n in [(17, 3), (5, 1), (9, 4), (2, 1), (17, 16), (12, 2), (7, 7 - 1)]]
    batched = ds.score_requests(model, requests, batch_size=3)
    with torch.no_grad():
        for (tokens, n), got in zip(requests, batched):
            logp = model(torch.tensor([tokens[:-1]])).float().log_softmax(-1)[0]
            want = sum(logp[t - 1, tokens[t]].item() for t in range(len(tokens) - n, len(tokens)))
            assert got == pytest.approx(want, abs=1e-4)


def test_long_contexts_are_cut_from_the_left():
    tok = word_tokenizer([f"w{i}" for i in range(20)])
    context = " ".join(f"w{i}" for i in range(15))
    requests, cut = ds.build_requests(tok, [ds.choice_example(context, ["w16 w17", "w18"], 0)], max_seq_len=8)
    assert cut == 2
    (first, n1), (second, n2) = requests
    assert len(first) == len(second) == 9 and (n1, n2) == (2, 1)
    assert first == tok.encode(" ".join(f"w{i}" for i in (*range(8, 15), 16, 17)))  # <eos> w0 .. w7 went
    assert second == tok.encode(" ".join(f"w{i}" for i in (*range(7, 15), 18)))


def test_wilson_interval_and_centring():
    assert ds.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    lo, hi = ds.wilson(0, 10)
    assert lo == 0 and 0.2 < hi < 0.3
    lo, hi = ds.wilson(5, 10)
    assert lo == pytest.approx(1 - hi)
    assert ds.centred(0.25, 0.25) == 0 and ds.centred(1.0, 0.25) == 1


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ITEMS = [{"context": "Three plus four is", "choices": ["seven", "eight", "two"], "label": 0},
         {"context": "Two plus two is", "choices": ["one", "four"], "label": 1},
         {"context": "", "choices": ["a", "b"], "label": 1}]


def test_local_files_jsonl_parquet_limit_and_hub_rows(tmp_path):
    task = ds.load_local("sums", write_jsonl(tmp_path / "sums.jsonl", ITEMS))
    assert [ex.label for ex in task.examples] == [0, 1, 1] and task.examples[0].contexts == ("Three plus four is",) * 3
    pq.write_table(pa.Table.from_pylist(ITEMS), tmp_path / "sums.parquet")
    assert ds.load_local("sums", tmp_path / "sums.parquet").examples == task.examples
    assert len(ds.load_local("sums", tmp_path / "sums.parquet", limit=2).examples) == 2

    # a local copy of a known task's own rows is read as the Hub's are
    arc = {"question": "Which is a gas?", "choices": {"text": ["rock", "steam"], "label": ["A", "B"]}, "answerKey": "B"}
    ex = ds.load_local("arc_easy", write_jsonl(tmp_path / "arc.jsonl", [arc])).examples[0]
    assert ex == ds.Example(("Question: Which is a gas?\nAnswer:",) * 2, ("rock", "steam"), 1)
    wino = {"sentence": "The cup fell off the table because _ was tipped.", "option1": "the cup", "option2": "the table",
            "answer": "2"}
    ex = ds.load_local("winogrande", write_jsonl(tmp_path / "w.jsonl", [wino])).examples[0]
    assert ex.contexts == ("The cup fell off the table because the cup", "The cup fell off the table because the table")
    assert ex.choices == ("was tipped.", "was tipped.") and ex.label == 1
    hella = {"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he", "label": "2",
             "endings": ["sings.", "[header] runs.", "bakes bread.", "sleeps."]}
    ex = ds.load_local("hellaswag", write_jsonl(tmp_path / "h.jsonl", [hella])).examples[0]
    assert ex.contexts[0] == "Baking: A man mixes flour. He" and ex.label == 2
    assert ex.choices[1] == " runs."  # the [header] marker goes, its space stays: the harness's text exactly


@pytest.mark.parametrize("row, fragment", [
    ('{"context": "x", "choices": ["a", "b"], "label": 0', "not valid JSON"),
    ('["x", ["a", "b"], 0]', "not a JSON object"),
    ({"context": "x", "choices": ["a"], "label": 0}, "at least two"),
    ({"context": "x", "choices": ["a", ""], "label": 0}, "at least two non-empty"),
    ({"context": "x", "choices": ["a", "b"], "label": 2}, "'label'"),
    ({"context": "x", "choices": ["a", "b"], "label": True}, "'label'"),
    ({"context": 3, "choices": ["a", "b"], "label": 0}, "'context'"),
    ({"question": "x"}, "'context'"),
])
def test_malformed_rows_name_the_line(tmp_path, row, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", [ITEMS[0], row])
    with pytest.raises(UserError, match=fragment) as e:
        ds.load_local("mine", path)
    assert f"{path}:2" in str(e.value)


def test_bad_specs_files_and_an_offline_hub(tmp_path, monkeypatch):
    assert ds.parse_tasks("hellaswag, mine=a.jsonl") == [ds.TaskSpec("hellaswag", None), ds.TaskSpec("mine", Path("a.jsonl"))]
    for spec, fragment in [("helaswag", "unknown task 'helaswag'"), ("a=", "NAME=PATH"), ("piqa,piqa", "twice"), (",", "no task")]:
        with pytest.raises(UserError, match=fragment):
            ds.parse_tasks(spec)
    with pytest.raises(UserError, match="file not found"):
        ds.load_local("mine", tmp_path / "nope.jsonl")
    (tmp_path / "items.csv").write_text("x\n")
    with pytest.raises(UserError, match="is not a .jsonl or .parquet file"):
        ds.load_local("mine", tmp_path / "items.csv")
    with pytest.raises(UserError, match="holds no items"):
        ds.load_local("mine", write_jsonl(tmp_path / "empty.jsonl", []))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="not a readable parquet file"):
        ds.load_local("mine", tmp_path / "broken.parquet")
    with pytest.raises(UserError, match="neither"):  # a known task's file in neither layout
        ds.load_local("piqa", write_jsonl(tmp_path / "p.jsonl", [{"goal": "x"}]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="--tasks hellaswag=PATH"):
        ds.load_hub("hellaswag")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub"):
        ds.load_hub("arc_easy")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny debug run (context 32 tokens), as tests/test_llm_scripts.py trains one."""
    root = tmp_path_factory.mktemp("downstream")
    proc = run_script("train_llm.py", "--config", DEBUG, "--experiment_name", "tiny", *TINY, cwd=root,
                      env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "runs" / "tiny"


@pytest.mark.slow
def test_script_writes_json_beside_the_run(tiny_run, tmp_path):
    long = {"context": "Once upon a time there was a brave fox named Ada. " * 4, "choices": ["Ada lived near the forest.", "Ben"],
            "label": 0}
    sums = write_jsonl(tmp_path / "sums.jsonl", ITEMS + [long])
    pq.write_table(pa.Table.from_pylist(ITEMS), tmp_path / "more.parquet")
    proc = run_script("evaluate_llm.py", "--checkpoint", str(tiny_run), "--tasks", f"sums={sums},more={tmp_path / 'more.parquet'}",
                      "--batch_size", "3", cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tiny_run / "eval" / "downstream.json"
    assert f"wrote {out}" in proc.stdout and "trained weights" in proc.stderr
    result = json.loads(out.read_text())
    assert result["ema"] is False and result["limit"] is None and "Wilson" in result["interval"]
    sums_r, more = result["tasks"]["sums"], result["tasks"]["more"]
    assert sums_r["examples"] == 4 and more["examples"] == 3 and sums_r["truncated"] == 2  # the long item's two choices
    assert more["random_baseline"] == round((1 / 3 + 1 / 2 + 1 / 2) / 3, 4)
    for r in (sums_r, more):
        for key in ("acc", "acc_norm"):
            lo, hi = r[f"{key}_ci95"]
            assert 0 <= lo <= r[key] <= hi <= 1
            assert r[f"centered_{key}"] == pytest.approx((r[key] - r["random_baseline"]) / (1 - r["random_baseline"]), abs=2e-4)
    assert result["aggregate"]["centered_acc_norm"] == pytest.approx(
        (sums_r["centered_acc_norm"] + more["centered_acc_norm"]) / 2, abs=1e-4)
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["task", "examples", "acc"] and lines[1].startswith("sums ")
    assert any(line.startswith("centred score over 2 tasks") for line in lines)

    limited = run_script("evaluate_llm.py", "--checkpoint", str(tiny_run), "--tasks", f"sums={sums}", "--limit", "2",
                         "--output", str(tmp_path / "x" / "r.json"), cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert limited.returncode == 0, limited.stderr[-2000:]
    assert json.loads((tmp_path / "x" / "r.json").read_text())["tasks"]["sums"]["examples"] == 2


@pytest.mark.slow
def test_script_bad_input_is_one_line(tiny_run, tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    proc = run_script("evaluate_llm.py", "--checkpoint", str(tiny_run), "--tasks", "hellaswag,nope", cwd=tmp_path, env_extra=env)
    assert_one_line_error(proc, "unknown task 'nope'")
    proc = run_script("evaluate_llm.py", "--checkpoint", str(tiny_run), "--tasks", f"mine={tmp_path / 'missing.jsonl'}",
                      cwd=tmp_path, env_extra=env)
    assert_one_line_error(proc, "file not found", "missing.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", [ITEMS[0], {"context": "x", "choices": "ab", "label": 0}])
    proc = run_script("evaluate_llm.py", "--checkpoint", str(tiny_run), "--tasks", f"mine={bad}", cwd=tmp_path, env_extra=env)
    assert_one_line_error(proc, f"{bad}:2", "'choices'")
    proc = run_script("evaluate_llm.py", "--checkpoint", str(tiny_run), "--tasks", "arc_easy", cwd=tmp_path,
                      env_extra={**env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_one_line_error(proc, "cannot reach the Hugging Face Hub", "--tasks arc_easy=PATH")
