"""Checkpoints: weights as safetensors, trainer state beside them, written atomically.

Layout under a run's `checkpoints/`:

    step_000100/model.safetensors   weights (and ema.safetensors when EMA is on)
    step_000100/state.pt            optimisers, schedule position, RNG, data position, counters
    latest                          the name of the newest complete checkpoint

A checkpoint is written into a temporary folder that is renamed into place when complete, and
`latest` is replaced atomically afterwards, so a crash mid-write never leaves a half checkpoint
as the latest. A write that fails (a full disk) removes what it wrote and leaves the previous
checkpoint as the latest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import parallel
from .errors import UserError

MODEL_FILE, EMA_FILE, STATE_FILE, LATEST = "model.safetensors", "ema.safetensors", "state.pt", "latest"
# what a full (or vanished) disk raises: OSError from Python, SafetensorError from safetensors'
# writer, RuntimeError from torch.save's zip writer ("[enforce fail at inline_container.cc] unexpected pos")
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free
    except (OSError, StopIteration):
        return "free space unknown"
    return f"{free / 2**20:,.1f} MiB free there"


def write_failure(e: BaseException, folder: Path) -> str:
    """A failed write as a short phrase with the free space when it failed (torch's zip writer never
    says the disk is full); save_checkpoint notes it before removing what it wrote."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
    notes = getattr(e, "__notes__", None)
    return f"{text}; {notes[-1] if notes else _free_space(folder)}"


def _tensors(weights: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied embeddings): store each distinct tensor once
    out, seen = {}, {}
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    for name, t in state.items():
        key = (t.data_ptr(), t.shape, t.dtype, t.device)
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write failed


def write_file_atomic(path: str | Path, write, what: str) -> None:
    """Write a file through `write(tmp_path)` and rename it into place: a failed write (a full disk)
    is one line, leaves no temporary file and keeps the previous file."""
    path = Path(path)
    try:
        _write_atomic(path, write)
    except WRITE_ERRORS as e:
        raise UserError(f"could not write {what} {path} ({write_failure(e, path.parent)}); the previous one is kept") from None


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module | dict, state: dict,
                    ema_model: nn.Module | dict | None = None, keep: int = 2) -> Path:
    """`model` and `ema_model`: modules or their (whole, unsharded) state dicts. A failed write
    (one of WRITE_ERRORS, raised again) leaves no partial folder, and the previous checkpoint stays
    the latest."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f".step_{step:06d}.partial"
    previous = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
    weights, ema_weights = _tensors(model), _tensors(ema_model) if ema_model is not None else None
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, tmp / MODEL_FILE, metadata={"step": str(step)})
        if ema_weights is not None:
            save_file(ema_weights, tmp / EMA_FILE, metadata={"step": str(step)})
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(ckpt_dir / LATEST, lambda p: p.write_text(final.name + "\n"))
    except WRITE_ERRORS as e:
        e.add_note(_free_space(ckpt_dir))  # measured before the partial write is removed
        shutil.rmtree(tmp, ignore_errors=True)
        if final.name != previous:  # complete but never named latest: the previous one stays the state
            shutil.rmtree(final, ignore_errors=True)
        raise
    old = sorted(d for d in ckpt_dir.glob("step_*") if d.is_dir() and d != final)
    for d in old[:max(0, len(old) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, a `checkpoints/` folder or a step folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    for candidate in (path, path / "checkpoints"):
        if (candidate / LATEST).is_file():
            name = (candidate / LATEST).read_text().strip()
            if not (candidate / name).is_dir():
                raise UserError(f"{candidate / LATEST} names {name!r}, which does not exist")
            return candidate / name
    if (path / MODEL_FILE).is_file():
        return path
    raise UserError(f"no checkpoint in {path} (expected {LATEST} or {MODEL_FILE})")


def load_weights(module: nn.Module, ckpt: Path, ema: bool = False) -> None:
    """Load `model.safetensors` (or the EMA weights) from a checkpoint folder into module."""
    file = ckpt / (EMA_FILE if ema else MODEL_FILE)
    if not file.is_file():
        raise UserError(f"{file} is missing" + (" (was the run trained without EMA?)" if ema else ""))
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {file} is corrupt or unreadable: {e}") from None
    # tied weights were stored once; anything else missing means the wrong model
    names = set(module.state_dict())
    missing = [n for n in names - set(tensors) if not _tied_alias_stored(module, n, tensors)]
    unexpected = sorted(set(tensors) - names)
    if missing or unexpected:
        raise UserError(f"checkpoint {file} does not fit this model: missing {sorted(missing)[:3]}, unexpected {unexpected[:3]}")
    try:
        if parallel.is_sharded(module):
            parallel.load_model_state(module, tensors)  # each rank keeps its shard of the whole tensors
        else:
            module.load_state_dict(tensors, strict=False)
    except (RuntimeError, ValueError) as e:  # shapes differ: another preset, tokenizer or class count
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise UserError(f"checkpoint {file} does not fit this model: {first}") from None


def _tied_alias_stored(module: nn.Module, name: str, stored: dict) -> bool:
    """Whether `name` is a parameter tied to another name that the checkpoint holds."""
    params: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), []).append(n)
    return any(name in group and any(other in stored for other in group) for group in params.values())


def load_state(ckpt: Path) -> dict:
    file = ckpt / STATE_FILE
    if not file.is_file():
        raise UserError(f"{file} is missing: this checkpoint holds weights only and cannot resume training")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a damaged pickle/zip
        raise UserError(f"trainer state {file} is corrupt or unreadable: {type(e).__name__}: {e}") from None
