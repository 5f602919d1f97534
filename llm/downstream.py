"""Downstream evaluation: zero-shot multiple choice (HellaSwag, ARC, PIQA, WinoGrande, OpenBookQA,
SciQ, or a local file of items) scored by log-likelihood, as lm-evaluation-harness scores it.

An item is a context and two or more choices. Each choice is scored as the log-probability of its
tokens, written after the context with one space between (the harness's target delimiter), given
the context. The context starts after an end-of-text token, as training documents do, and is cut
from the left when context and choice exceed the model's context length. Two predictions per item:

  acc        the choice with the highest summed log-probability
  acc_norm   the highest summed log-probability per character of the choice text (the harness's
             acc_norm): a long choice does not lose merely for having more tokens

Per task: accuracy with a 95% Wilson score interval, and the random baseline, the mean of
1/choices. Across tasks, a score centred on chance as nanochat's CORE centres it:
(acc - baseline) / (1 - baseline) per task, averaged; 0 is chance, 1 is every item right.

A local task file (`.jsonl`, one JSON object per line, or `.parquet`) holds one item per row:

    {"context": "Three plus four is", "choices": ["seven", "eight", "two"], "label": 0}

`context` is text (it may be empty), `choices` a list of at least two non-empty texts, `label` the
index of the right choice. A file given for a known task name may instead hold that task's own Hub
rows (a local copy of the dataset, e.g. its parquet export); they are read as the Hub's are.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from shared.errors import UserError
from shared.hub import hub_failure, require_hub

from .sources import jsonl_rows, parquet_rows
from .tokenizer import TextTokenizer

DELIMITER = " "  # between a context and a choice (lm-evaluation-harness's target_delimiter)
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
SCHEMA = 'rows like {"context": "...", "choices": ["...", "..."], "label": 0}'
SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class Example:
    """One item: choice i is the text `choices[i]` scored after `contexts[i]`. Most tasks repeat
    one context; WinoGrande puts each option in its context and scores the same ending."""

    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    label: int


def choice_example(context: str, choices: Sequence[str], label: int) -> Example:
    """The usual shape: one context, several endings."""
    return Example((context,) * len(choices), tuple(choices), int(label))


# Hub tasks: the dataset, its config, the split lm-evaluation-harness reports, and a row -> Example
# function following the harness's prompts (zero-shot).

def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # WikiHow's [header] / [step] markers
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Example:
    context = row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return choice_example(_hellaswag_text(context), [_hellaswag_text(e) for e in row["endings"]], int(row["label"]))


def _arc(row: dict) -> Example:
    return choice_example(f"Question: {row['question']}\nAnswer:", row["choices"]["text"],
                          row["choices"]["label"].index(row["answerKey"]))


def _piqa(row: dict) -> Example:
    return choice_example(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _winogrande(row: dict) -> Example:
    """Partial scoring (Trinh & Le 2018): each option replaces the blank, and the rest of the
    sentence after the blank is what is scored."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    ending = sentence[blank + 1:].strip()
    return Example(tuple(sentence[:blank] + o for o in (row["option1"], row["option2"])), (ending, ending),
                   {"1": 0, "2": 1}[str(row["answer"])])


def _openbookqa(row: dict) -> Example:
    return choice_example(row["question_stem"], row["choices"]["text"],
                          row["choices"]["label"].index(row["answerKey"].lstrip()))


def _sciq(row: dict) -> Example:
    return choice_example(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:",
                          [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]], 3)


@dataclass(frozen=True)
class HubTask:
    dataset: str
    config: str | None
    split: str
    convert: Callable[[dict], Example]

    def describe(self) -> str:
        return f"{self.dataset}" + (f":{self.config}" if self.config else "") + f" {self.split}"


TASKS: dict[str, HubTask] = {
    "hellaswag": HubTask("Rowan/hellaswag", None, "validation", _hellaswag),
    "arc_easy": HubTask("allenai/ai2_arc", "ARC-Easy", "test", _arc),
    "arc_challenge": HubTask("allenai/ai2_arc", "ARC-Challenge", "test", _arc),
    "piqa": HubTask("baber/piqa", None, "validation", _piqa),
    "winogrande": HubTask("allenai/winogrande", "winogrande_xl", "validation", _winogrande),
    "openbookqa": HubTask("allenai/openbookqa", "main", "test", _openbookqa),
    "sciq": HubTask("allenai/sciq", None, "test", _sciq),
}


def task_table() -> str:
    return "known tasks (Hugging Face dataset[:config] split):\n" + "\n".join(
        f"  {name:<14}{t.describe()}" for name, t in TASKS.items())


# Reading tasks

@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: Path | None  # a local file, or None for the Hub


@dataclass
class Task:
    name: str
    source: str
    examples: list[Example]


def parse_tasks(text: str) -> list[TaskSpec]:
    """`hellaswag,arc_easy,mine=path/to/items.jsonl`: known names from the Hub, NAME=PATH from a file."""
    specs: list[TaskSpec] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, eq, path = (s.strip() for s in item.partition("="))
        if not name or (eq and not path):
            raise UserError(f"--tasks: {item!r} should be NAME or NAME=PATH")
        if not eq and name not in TASKS:
            raise UserError(f"unknown task {name!r}: known tasks are {', '.join(TASKS)}; a local file is given as "
                            f"NAME=PATH ({' or '.join(SUFFIXES)})")
        if any(s.name == name for s in specs):
            raise UserError(f"--tasks names {name!r} twice")
        specs.append(TaskSpec(name, Path(path).expanduser() if eq else None))
    if not specs:
        raise UserError("--tasks names no task")
    return specs


def _problem(row: dict) -> str | None:
    """What is wrong with a local row of the simple schema, or None."""
    context, choices, label = row.get("context"), row.get("choices"), row.get("label")
    if not isinstance(context, str):
        return "'context' must be text"
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c.strip() for c in choices)):
        return "'choices' must be a list of at least two non-empty texts"
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        return f"'label' must be an integer index into the {len(choices)} choices"
    return None


def _check(example: Example, where: str) -> Example:
    n = len(example.choices)
    if n < 2 or len(example.contexts) != n or not 0 <= example.label < n:
        raise UserError(f"{where}: an item needs at least two choices and a label among them")
    if not all(isinstance(t, str) for t in (*example.contexts, *example.choices)):
        raise UserError(f"{where}: contexts and choices must be text")
    return example


def _convert(name: str, row: dict, where: str, local: bool) -> Example:
    if local and ("context" in row or name not in TASKS):
        problem = _problem(row)
        if problem:
            raise UserError(f"{where}: {problem} ({SCHEMA})")
        return choice_example(row["context"], row["choices"], row["label"])
    task = TASKS[name]
    try:
        return _check(task.convert(row), where)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        hint = f"neither {SCHEMA} nor " if local else ""
        raise UserError(f"{where}: {hint}a {name} row of {task.dataset} ({type(e).__name__}: {e})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    return ((f"{path}:{i}", row) for i, row in jsonl_rows(path, SCHEMA))


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    return ((f"{path} row {n}", row) for n, row in enumerate(parquet_rows(path), 1))


def load_local(name: str, path: Path, limit: int = 0) -> Task:
    """The first `limit` items (0 = all) of a .jsonl or .parquet file."""
    if not path.exists():
        raise UserError(f"task {name!r}: file not found: {path}")
    if not path.is_file() or path.suffix not in SUFFIXES:
        raise UserError(f"task {name!r}: {path} is not a {' or '.join(SUFFIXES)} file")
    rows = _jsonl_rows(path) if path.suffix == ".jsonl" else _parquet_rows(path)
    examples = []
    try:
        for where, row in rows:
            examples.append(_convert(name, row, where, local=True))
            if limit and len(examples) == limit:
                break
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not examples:
        raise UserError(f"task {name!r}: {path} holds no items ({SCHEMA})")
    return Task(name, str(path), examples)


def load_hub(name: str, limit: int = 0) -> Task:
    """A known task's split from the Hugging Face Hub (cached by `datasets` after the first time)."""
    task = TASKS[name]
    require_hub(f"task {name!r} (dataset {task.dataset})",
                f"give a local copy of it as --tasks {name}=PATH ({' or '.join(SUFFIXES)})")
    import datasets

    split = f"{task.split}[:{limit}]" if limit else task.split
    try:
        rows = datasets.load_dataset(task.dataset, task.config, split=split)
    except Exception as e:  # DatasetNotFoundError, a missing config, connection errors...
        what, lost = hub_failure(e)
        raise UserError(f"could not load {task.describe()} for task {name!r} from the Hugging Face Hub "
                        f"({what})" + (f"; give a local copy as --tasks {name}=PATH" if lost else "")) from None
    examples = [_convert(name, row, f"{task.describe()} row {i + 1}", local=False) for i, row in enumerate(rows)]
    return Task(name, task.describe(), examples)


def load_task(spec: TaskSpec, limit: int = 0) -> Task:
    return load_hub(spec.name, limit) if spec.path is None else load_local(spec.name, spec.path, limit)


# Scoring

Request = tuple[list[int], int]  # a token row, and how many tokens at its end are scored


def encode_pair(tokenizer: TextTokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """Context and choice tokens as the harness makes them: the context's trailing whitespace moves
    to the choice, and the choice's tokens are those of the whole text after the context's, so a
    merge across the boundary follows the text as the model would have seen it."""
    continuation = DELIMITER + choice
    stripped = context.rstrip()
    continuation, context = context[len(stripped):] + continuation, stripped
    ctx = tokenizer.encode(context)
    return ctx, tokenizer.encode(context + continuation)[len(ctx):]


def build_requests(tokenizer: TextTokenizer, examples: Sequence[Example], max_seq_len: int) -> tuple[list[Request], int]:
    """One request per choice, item by item, and how many were cut to fit `max_seq_len` (from the
    left: the model reads at most max_seq_len tokens and predicts the one after each)."""
    requests, cut = [], 0
    for ex in examples:
        for context, choice in zip(ex.contexts, ex.choices):
            ctx, cont = encode_pair(tokenizer, context, choice)
            if not cont:
                raise UserError(f"the choice {choice!r} has no tokens of its own after {context[-40:]!r}")
            row = [tokenizer.eos_id, *ctx, *cont]
            if len(row) > max_seq_len + 1:
                row, cut = row[-(max_seq_len + 1):], cut + 1
            requests.append((row, min(len(cont), len(row) - 1)))
    return requests, cut


@torch.no_grad()
def score_requests(model: torch.nn.Module, requests: Sequence[Request], batch_size: int = 32,
                   dtype: torch.dtype = torch.float32, desc: str | None = None) -> list[float]:
    """Summed log-probability of each request's scored tokens given the tokens before them.

    `model` is a Decoder (or anything with `hidden` [B, T, D] and `logits`, the output layer). Rows are sorted by
    length and right-padded per batch (causal attention: padding never reaches earlier positions);
    the output layer runs only at the scored positions, in fp32, never over the full [B, T, V] logits.
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]), reverse=True)
    totals = [0.0] * len(requests)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", mininterval=1.0, disable=desc is None, leave=False):
        batch = order[s:s + batch_size]
        x = torch.zeros(len(batch), len(requests[batch[0]][0]) - 1, dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, i in enumerate(batch):
            tokens, n = requests[i]
            x[r, :len(tokens) - 1] = torch.tensor(tokens[:-1])
            rows += [r] * n
            cols += range(len(tokens) - 1 - n, len(tokens) - 1)
            targets += tokens[-n:]
        rows_t = torch.tensor(rows, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            h = model.hidden(x.to(device))[rows_t, torch.tensor(cols, device=device)]
        logits = model.logits(h.float()).float()  # fp32 at the few scored positions: close choices stay apart
        logp = F.log_softmax(logits, -1).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows_t, logp.double())
        for i, v in zip(batch, sums.tolist()):
            totals[i] = v
    return totals


def predictions(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(acc's choice, acc_norm's choice): the highest summed log-probability, and the highest per
    character of the choice text; ties go to the first."""
    n = range(len(choices))
    best = max(n, key=lambda i: logprobs[i])
    best_norm = max(n, key=lambda i: logprobs[i] / max(len(choices[i]), 1))
    return best, best_norm


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (stays inside [0, 1] and behaves at 0 or n right)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def centred(acc: float, baseline: float) -> float:
    """nanochat CORE's centring: 0 at chance, 1 when every item is right."""
    return (acc - baseline) / (1 - baseline)


def task_metrics(examples: Sequence[Example], logprobs: Sequence[float]) -> dict:
    """Scores of a task from its choices' log-probabilities (item by item, as build_requests orders them)."""
    n, correct, correct_norm, baseline, i = len(examples), 0, 0, 0.0, 0
    for ex in examples:
        k = len(ex.choices)
        best, best_norm = predictions(logprobs[i:i + k], ex.choices)
        correct += best == ex.label
        correct_norm += best_norm == ex.label
        baseline += 1 / k
        i += k
    baseline /= n
    acc, acc_norm = correct / n, correct_norm / n
    return {"examples": n, "mean_choices": round(i / n, 4), "random_baseline": round(baseline, 4),
            "acc": round(acc, 4), "acc_ci95": [round(v, 4) for v in wilson(correct, n)],
            "acc_norm": round(acc_norm, 4), "acc_norm_ci95": [round(v, 4) for v in wilson(correct_norm, n)],
            "centered_acc": round(centred(acc, baseline), 4), "centered_acc_norm": round(centred(acc_norm, baseline), 4)}


def evaluate(model: torch.nn.Module, tokenizer: TextTokenizer, tasks: Sequence[Task], batch_size: int = 32,
             dtype: torch.dtype = torch.float32, progress: bool = True) -> dict:
    """Every task's scores and the centred aggregate, as JSON-ready values."""
    results = {}
    for task in tasks:
        t0 = time.perf_counter()
        requests, cut = build_requests(tokenizer, task.examples, model.max_seq_len)
        logprobs = score_requests(model, requests, batch_size, dtype, desc=task.name if progress else None)
        results[task.name] = {"source": task.source, **task_metrics(task.examples, logprobs), "truncated": cut,
                              "seconds": round(time.perf_counter() - t0, 2)}
    def mean(key: str) -> float:
        return round(sum(r[key] for r in results.values()) / len(results), 4)

    return {"interval": "95% Wilson score interval",
            "scoring": f"log p(' ' + choice | <eos> + context), summed (acc) and per character of the choice (acc_norm); "
                       f"contexts cut from the left to {model.max_seq_len} tokens",
            "tasks": results,
            "aggregate": {"tasks": len(results), "centered_acc": mean("centered_acc"),
                          "centered_acc_norm": mean("centered_acc_norm")}}


def report_lines(result: dict) -> list[str]:
    """The results as an aligned table, then the centred aggregate."""
    head = ("task", "examples", "acc", "95% CI", "acc_norm", "95% CI", "random", "centred acc_norm")
    rows = [head]
    for name, r in result["tasks"].items():
        ci, ci_n = (f"[{a:.3f}, {b:.3f}]" for a, b in (r["acc_ci95"], r["acc_norm_ci95"]))
        rows.append((name, f"{r['examples']:,}", f"{r['acc']:.4f}", ci, f"{r['acc_norm']:.4f}", ci_n,
                     f"{r['random_baseline']:.4f}", f"{r['centered_acc_norm']:+.4f}"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    lines = ["  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    agg = result["aggregate"]
    lines.append(f"centred score over {agg['tasks']} task{'s' if agg['tasks'] > 1 else ''} ((acc - random) / (1 - random), "
                 f"averaged): acc {agg['centered_acc']:+.4f}, acc_norm {agg['centered_acc_norm']:+.4f}")
    cut = sum(r["truncated"] for r in result["tasks"].values())
    if cut:
        lines.append(f"{cut} choice{'s were' if cut > 1 else ' was'} cut from the left to the model's context length")
    return lines
