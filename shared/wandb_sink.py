"""Weights & Biases as a second home for a run's metrics (`train.wandb = "PROJECT"`), optional.

Everything the JSONL holds is logged under `split/key` at the same step, with the resolved config,
samples (text) and image grids; rank 0 only, since only rank 0 logs. The W&B run id is kept in the
run folder (`wandb-id.txt`), so `--resume` continues the same W&B run. Without credentials or
network W&B runs offline (`WANDB_MODE=offline`, also chosen automatically when no API key is
configured): the run is written under `RUN/wandb/` and `wandb sync` uploads it later.
"""

from __future__ import annotations

import html
import os
import re
import uuid
from pathlib import Path

from .errors import UserError

ID_FILE = "wandb-id.txt"
# W&B refuses these in project names; checked here so a bad name fails before any training
BAD_PROJECT = re.compile(r"[/\\#?%:]")


def check_project(project: str) -> None:
    if not project.strip() or BAD_PROJECT.search(project) or len(project) > 128:
        raise UserError(f"train.wandb={project!r} is not a W&B project name: up to 128 characters, none of / \\ # ? % :")


def _import():
    try:
        import wandb
    except ImportError:
        raise UserError("train.wandb needs the wandb package: pip install -e \".[wandb]\"") from None
    return wandb


def check_available(project: str) -> None:
    """Before any work: the package is there and the name is one W&B takes."""
    check_project(project)
    _import()


def _mode(wandb) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = bool(wandb.api.api_key)
        except Exception:  # no settings file: no key
            has_key = False
    return "online" if has_key else "offline"


class WandbSink:
    def __init__(self, project: str, run_dir: Path, config: dict | None, resuming: bool):
        check_project(project)
        wandb = _import()
        self._wandb = wandb
        id_file = Path(run_dir) / ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        mode = _mode(wandb)
        if mode == "offline":
            print(f"W&B offline (no API key or WANDB_MODE=offline): the run is kept in {Path(run_dir) / 'wandb'}; "
                  "upload it with `wandb sync`", flush=True)
        try:
            self.run = wandb.init(project=project, name=Path(run_dir).name, id=run_id, resume="allow", dir=str(run_dir),
                                  config=config or {}, mode=mode)
        except Exception as e:  # W&B's own errors (network, authentication) in one line
            raise UserError(f"W&B could not start a run in project {project!r}: {str(e).splitlines()[0] if str(e) else e}; "
                            "set WANDB_MODE=offline to log offline") from None

    def log(self, step: int, split: str, values: dict) -> None:
        flat = {}
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # lists (tokens per expert) and text stay in the JSONL
            flat[f"{split}/{k}"] = v
        if flat:
            self.run.log(flat, step=step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def add_image(self, tag: str, image_chw, step: int) -> None:
        self.run.log({tag: self._wandb.Image(image_chw.permute(1, 2, 0).cpu().numpy())}, step=step)

    def close(self) -> None:
        self.run.finish()
