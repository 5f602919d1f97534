"""One training loop for every package.

The loop knows nothing of text or images. A package hands it a model, a `Task` (loss,
evaluation, samples) and a `BatchSource` (batches plus a resumable position), and the loop calls
them only through what shared/contracts.py declares (a model may mix in `ModelHooks`). It does
the rest: bf16 autocast over fp32 weights, gradient accumulation and clipping, Muon + AdamW with a
schedule, optional torch.compile (warm-up timed separately), EMA, evaluation and samples at unit
milestones, checkpoints with exact resume, metrics, a progress bar and a summary at the end.

Lengths are counted in the task's unit (tokens for text, images for images): `budget`,
`eval_every`, `sample_every` and `ckpt_every` are all in that unit.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from . import distributed, parallel
from .checkpoint import (
    WRITE_ERRORS,
    load_state,
    load_weights,
    save_checkpoint,
    write_failure,
    write_file_atomic,
)
from .config import load_toml
from .contracts import BatchSource, ModelHooks, Task
from .cpuload import OtherLoad
from .cpumem import keep_freed_memory
from .ema import EMA, warmup_horizon
from .errors import ConfigError, UserError
from .metrics import MetricsLogger, plot_loss_curve
from .optim import OptimConfig, apply_schedule, build_optimizers, lr_multiplier
from .run import check_writable


@dataclass
class TrainConfig:
    seed: int = 0
    budget: int = 1_000_000  # training length in the task's unit
    batch_size: int = 16  # per micro-batch
    grad_accum: int = 1
    eval_every: int = 0  # units between evaluations; 0 = at the end only
    sample_every: int = 0  # units between sample hooks; 0 = at the end only
    ckpt_every: int = 0  # units between checkpoints; 0 = at the end only
    keep_checkpoints: int = 2
    log_every: int = 10  # optimiser steps between training-loss records
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    ema_decay: float = 0.0  # 0 turns EMA off
    device: str = "auto"
    # a non-finite loss or gradient norm: "stop" (checked on the device every step, read at logging
    # points: no extra sync) or "skip" the update (one host sync per step), stopping after max_skips in a row
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skips: int = 10
    # several processes (torchrun / accelerate launch): "ddp" replicates the model; "fsdp" shards
    # weights, gradients and optimiser state (FSDP2, transformer stacks only); one process ignores it
    parallel: Literal["ddp", "fsdp"] = "ddp"
    wandb: str = ""  # a Weights & Biases project to log to as well (pip install -e ".[wandb]"); "" = none

    def __post_init__(self):
        for name in ("budget", "batch_size", "grad_accum", "log_every", "max_skips"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if min(self.eval_every, self.sample_every, self.ckpt_every, self.keep_checkpoints) < 0:
            raise ConfigError("train.eval_every, sample_every, ckpt_every and keep_checkpoints must not be negative")
        if not 0.0 <= self.ema_decay < 1.0:  # NaN fails this too
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")
        if self.wandb:  # the package and the name, before any work
            from .wandb_sink import check_available
            check_available(self.wandb)


def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """`local_rank`: this process's GPU when several processes share a machine."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA GPU is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if local_rank is not None and name.startswith("cuda"):
        if name != "cuda":
            raise ConfigError(f"train.device={name} with several processes: use auto or cuda (each process takes "
                              "the GPU of its LOCAL_RANK)")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 autocast on GPUs that support it natively (a GPU that only emulates bf16, before
    Ampere, runs it slower than fp32); on a CPU only when asked (measured here: fp32 is faster on
    CPUs without native bf16 matmuls)."""
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        if precision == "bf16":
            raise UserError("precision bf16 requested but this GPU has no bf16 support")
        return torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def enable_tf32(device: torch.device) -> bool:
    """fp32 matmuls and convolutions on a CUDA GPU run on TF32 tensor cores (10-bit mantissa
    products, fp32 accumulation), as every GPU trainer in the field does: several times faster
    than IEEE fp32, and below bf16 autocast's rounding. Returns whether it applies."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # the API of torch 2.9+; mixing in allow_tf32 is an error
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    return True


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what platform knows: speeds of two runs
    compare only on one CPU, and "x86_64" names none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "cpu_isa": torch.backends.cpu.get_cpu_capability(),
            "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def to_device(batch: Any, device: torch.device) -> Any:
    def move(t: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda" and t.device.type == "cpu":
            # a pinned copy is asynchronous, a pageable one blocks the host; a strided view (the
            # shifted halves of a token row) would be pinned through a pageable temporary
            t = t.contiguous().pin_memory()
        return t.to(device, non_blocking=True)

    return distributed.map_tensors(move, batch)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class Due(NamedTuple):
    log: bool
    eval: bool
    sample: bool
    checkpoint: bool


class StepTimer:
    """Training time, measured between logging points (the GPU runs ahead in between, so the
    device is synchronised before each reading). The first interval after `warming` is set counts
    as warm-up (compilation); evaluation, samples and checkpoints fall between `lap` and `start`
    and are never counted. `rate` is the units per second since the last call. `others` counts
    what other processes took of the CPU over the training time (shared/cpuload.py)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.others = OtherLoad()
        self.train_time = self.warmup_time = 0.0
        self.units = 0  # units trained in train_time
        self.warming = False
        self._pending = self._window_units = 0
        self._window_time = self._mark = 0.0

    def start(self) -> None:
        self.sync()
        if not self.warming:
            self.others.start()  # before the mark: reading /proc/stat is not training time
        self._mark = time.perf_counter()

    def stepped(self, units: int) -> None:
        self._pending += units

    def lap(self) -> None:
        self.sync()
        dt = time.perf_counter() - self._mark
        if self.warming:
            self.warmup_time += dt
            self.warming = False
        else:
            self.others.stop()
            self.train_time += dt
            self.units += self._pending
            self._window_units += self._pending
            self._window_time += dt
        self._pending = 0

    def rate(self) -> float:
        rate = self._window_units / self._window_time if self._window_time > 0 else 0.0
        self._window_units, self._window_time = 0, 0.0
        return rate


class Trainer:
    def __init__(self, model: nn.Module, task: Task, data: BatchSource, cfg: TrainConfig, optim: OptimConfig,
                 run_dir: Path, quiet: bool = False):
        self.cfg, self.optim_cfg, self.task, self.data = cfg, optim, task, data
        self.run_dir = Path(run_dir)
        self.dist = distributed.setup()
        self.device = pick_device(cfg.device, self.dist.local_rank if self.dist.active else None)
        self.dtype = pick_dtype(cfg.precision, self.device)
        self.tf32 = enable_tf32(self.device)
        self.kept_memory = self.device.type == "cpu" and keep_freed_memory()
        self.model = model.to(self.device)
        self.sharded = self.dist.active and cfg.parallel == "fsdp"
        if self.sharded:
            if cfg.ema_decay > 0:
                raise ConfigError("train.ema_decay needs whole weights on every rank: use train.parallel=\"ddp\" "
                                  "or train.ema_decay=0 with FSDP")
            parallel.shard(self.model)  # before the optimisers, which then hold the sharded parameters
        self.accum = distributed.plan_accumulation(cfg.grad_accum, cfg.batch_size, self.dist.rank, self.dist.world)
        self.optimizers = build_optimizers(self.model, optim)
        self.units_per_step = data.units_per_batch * cfg.grad_accum
        self.total_steps = math.ceil(cfg.budget / self.units_per_step)
        # the EMA's warm-up is sized to this run, so train.ema_decay is the decay it ends with
        self.ema = EMA(self.model, cfg.ema_decay, horizon=warmup_horizon(cfg.ema_decay, self.total_steps)) \
            if cfg.ema_decay > 0 else None
        wrapped = parallel.wrap_ddp(self.model, self.device) if self.dist.active and not self.sharded else self.model
        self.forward_model = torch.compile(wrapped) if cfg.compile else wrapped
        self.step = 0
        self.timer = StepTimer(self._sync)
        self.quiet = quiet or not self.dist.main
        self.stop_requested = False  # set by Ctrl-C or SIGTERM: stop at the next step boundary and checkpoint
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.skipped = self.skips_in_row = 0
        self.run_dir_made = False  # set once fit() has made the run folder: from then on it must stay

    # ---------------------------------------------------------------- state
    def _state(self) -> dict:
        # optimiser states first: under FSDP gathering them is a collective every rank joins
        state = {"optimizers": [parallel.optimizer_state(self.model, o) for o in self.optimizers],
                 "step": self.step, "train_time": self.timer.train_time, "compile_time": self.timer.warmup_time,
                 "timed_units": self.timer.units, "others_cpu": self.timer.others.totals, "data": self.data.state_dict(), "rng_cpu": torch.get_rng_state(),
                 "units_per_step": self.units_per_step, "skipped": self.skipped, "sharded": self.sharded,
                 "world_size": self.dist.world}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save(self) -> Path:
        """Write a checkpoint, unless the weights are not finite: a diverged run must never replace
        (or prune) its last good checkpoint. A failed write (a full disk) keeps the previous one."""
        modules = [self.model] + ([self.ema.shadow] if self.ema else [])
        finite = torch.stack([torch.isfinite(parallel.local(p)).all() for m in modules for p in m.parameters()]).all()
        if distributed.any_across(~finite):  # one sync per checkpoint
            raise UserError(f"the weights at step {self.step} are not finite; no checkpoint written, "
                            f"the last good one is kept in {self.run_dir / 'checkpoints'}")
        self._measure_ema_batchnorm()  # the saved EMA weights carry statistics that fit them
        ckpt_dir = self.run_dir / "checkpoints"
        weights, state = parallel.model_state(self.model), self._state()  # collectives under FSDP
        self._check_run_dir()
        if not self.dist.main:
            return ckpt_dir  # rank 0 writes
        try:  # save_checkpoint removes what a failed write left
            return save_checkpoint(ckpt_dir, self.step, weights, state,
                                   self.ema.shadow.state_dict() if self.ema else None, keep=self.cfg.keep_checkpoints)
        except WRITE_ERRORS as e:
            raise UserError(f"could not write a checkpoint at step {self.step} in {ckpt_dir} ({write_failure(e, ckpt_dir)}); "
                            "the previous checkpoint is kept") from None

    def _check_run_dir(self) -> None:
        """Stop when the run folder was deleted while training: writing on would recreate it with
        checkpoints but without its config.toml. One stat, at logging points and before writes."""
        if not self.run_dir_made:
            return
        gone = self.dist.main and not self.run_dir.is_dir()
        if self.dist.active:  # every rank stops at the same point
            gone = bool(distributed.any_across(torch.tensor(gone, device=self.device)))
        if gone:
            raise UserError(f"the run folder {self.run_dir} was deleted while training: stopped at step {self.step} "
                            "without recreating it")

    def _restore(self, ckpt: Path) -> None:
        state = load_state(ckpt)
        load_weights(self.model, ckpt)
        if self.ema is not None:
            load_weights(self.ema.shadow, ckpt, ema=True)
            self.ema.load_state_dict(state["ema"])
        if len(state["optimizers"]) != len(self.optimizers):
            raise UserError(f"checkpoint {ckpt} has {len(state['optimizers'])} optimisers, this run builds {len(self.optimizers)}")
        by_name = state.get("sharded", False)  # optimiser states gathered from FSDP shards, keyed by name
        if self.sharded and not by_name:
            raise UserError(f"checkpoint {ckpt} was written without FSDP: resume it with train.parallel=\"ddp\"")
        if state["units_per_step"] != self.units_per_step:
            raise UserError(f"checkpoint {ckpt} took {state['units_per_step']:,} {self.task.unit} per step, this run "
                            f"takes {self.units_per_step:,}: keep train.batch_size, train.grad_accum and the sequence length")
        for opt, s in zip(self.optimizers, state["optimizers"]):
            current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            parallel.load_optimizer_state(self.model, opt, s, by_name)
            for group, settings in zip(opt.param_groups, current):  # the config in force wins
                group.update(settings)
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.step, self.skipped = state["step"], state.get("skipped", 0)
        self.timer.train_time, self.timer.warmup_time, self.timer.units = state["train_time"], state["compile_time"], state["timed_units"]
        self.timer.others.totals = state.get("others_cpu")  # absent (unknown) in checkpoints written before it was measured

    # ---------------------------------------------------------------- loop
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        apply_schedule(self.optimizers, self.step, self.total_steps, self.optim_cfg)
        total = torch.zeros((), device=self.device)
        mine = self.accum.micro_batches
        for j in range(self.accum.total):  # every rank draws every micro-batch: one data position for all
            if j not in mine:
                self.data.skip_batch()
                continue
            batch = to_device(distributed.take_rows(self.data.next_batch(), self.accum.rows), self.device)
            # the task's random draws (noise, times, crops) follow from (seed, step, micro-batch), whichever
            # rank trains it: N processes draw what one would, and a resumed run what an uninterrupted one would
            torch.manual_seed(self._micro_seed(j))
            with parallel.accumulating(self.forward_model, self.model, sync=j == mine[-1]):
                with self._autocast():
                    loss = self.task.loss(self.forward_model, batch)
                (loss / len(mine)).backward()
            total += loss.detach()
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.optim_cfg.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        grad_norm = parallel.whole(grad_norm)
        bad = ~(torch.isfinite(total) & torch.isfinite(grad_norm))
        skip = False
        if self.cfg.on_nonfinite == "skip":
            skip = bool(distributed.any_across(bad))  # the one host sync per step that skipping costs
            self.skips_in_row = self.skips_in_row + 1 if skip else 0
            self.skipped += skip
            if self.skips_in_row >= self.cfg.max_skips:
                raise UserError(f"training diverged: {self.skips_in_row} non-finite steps in a row up to step "
                                f"{self.step + 1}; the last good checkpoint is kept")
        else:
            self.nonfinite = self.nonfinite | bad  # read where the loop synchronises anyway
        if not skip:
            for opt in self.optimizers:
                opt.step()
            if isinstance(self.model, ModelHooks):  # state a model moves outside the gradient
                self.model.after_optimizer_step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.ema is not None and not skip:
            self.ema.update(self.model)
        self.step += 1
        return total / len(mine), grad_norm

    def _micro_seed(self, micro_batch: int) -> int:
        return (self.cfg.seed * 1_000_003 + self.step) * 1_009 + micro_batch

    def _crossed(self, every: int) -> bool:
        if every <= 0:
            return False
        before = (self.step - 1) * self.units_per_step
        return before // every != (self.step * self.units_per_step) // every

    def eval_model(self) -> nn.Module:
        if self.ema is None:
            return self.model
        self._measure_ema_batchnorm()
        return self.ema.shadow

    def _measure_ema_batchnorm(self) -> None:
        """BatchNorm statistics for the EMA weights (shared/ema.py says why), from the training
        batches ahead; the data position and the RNG are put back, so training is unchanged."""
        if self.ema is None or not self.ema.batchnorm_stale:
            return
        position, rng = self.data.state_dict(), torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        with self._autocast():
            self.ema.measure_batchnorm(lambda shadow: self.task.loss(shadow, to_device(self.data.next_batch(), self.device)))
        self.data.load_state_dict(position)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @contextlib.contextmanager
    def _inference(self):
        """The model to evaluate or sample (the EMA's when kept), in eval mode, without gradients,
        in the training precision, with a sharded root's weights gathered; training mode after."""
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast(), parallel.gathered(self.model):
                yield self.eval_model()
        finally:
            self.model.train()

    def _evaluate(self, logger: MetricsLogger, bar) -> dict:
        # rank 0 alone under DDP (the whole model is there); every rank under FSDP, whose forward
        # gathers weights from all of them
        if not (self.dist.main or self.sharded):
            return {}
        with self._inference() as model:
            metrics = self.task.evaluate(model)
        if self.dist.main:
            logger.log(self.step, "eval", units=self.step * self.units_per_step, **metrics)
        if not self.quiet:
            bar.write(f"step {self.step} ({self.step * self.units_per_step:,} {self.task.unit}): "
                      + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    def _sample(self, logger: MetricsLogger) -> None:
        self._check_run_dir()  # the sample hook creates folders under it
        if not (self.dist.main or self.sharded):
            return
        with self._inference() as model, _output_folder(self.run_dir, self.dist.main) as folder:
            self.task.sample(model, self.step, folder, logger)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fit(self, resume_from: Path | None = None, on_start: Callable[[], None] | None = None) -> dict:
        """Train to the budget. `on_start` runs once the checkpoint (if any) has been restored and
        before anything is written, so a refused resume leaves the run folder as it was."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        logger = self._open_run(resume_from, on_start)
        self.model.train()
        eval_metrics: dict = {}
        # this process's first step pays for compilation, and on a GPU for kernel selection and the
        # compiled loss chunks (shared/losses.py) even in an eager run: it is warm-up, not training time
        self.timer.warming = cfg.compile or self.device.type == "cuda"
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=self.quiet, mininterval=1.0)
        with _stop_on_interrupt(self), contextlib.closing(bar):  # an error is printed below the bar, not over it
            self.timer.start()
            while self.step < self.total_steps:
                if self.stop_requested and not self.dist.active:
                    self._stop(bar, logger)
                loss, grad_norm = self.train_step()
                self.timer.stepped(self.units_per_step)
                bar.update(1)
                due = self._due()
                if not any(due):
                    continue  # no host synchronisation between logging points: the GPU runs ahead
                self._check_run_dir()
                loss_value = distributed.mean_across(loss).item() if due.log else math.nan
                self._check_finite()
                self.timer.lap()
                if math.isfinite(loss_value):  # nan: not a logging step, or a skipped step
                    self._log_train(logger, bar, loss_value, grad_norm)
                if due.eval:
                    eval_metrics = self._evaluate(logger, bar)
                if due.sample:
                    self._sample(logger)
                if due.checkpoint:
                    self.save()
                if self.dist.active and self._stop_agreed():  # ranks stop at the same step, checked where they sync anyway
                    self._stop(bar, logger)
                self.timer.start()  # evaluation, samples and checkpoints are not training time
        bar.close()
        logger.close()
        return self._finish(eval_metrics)

    def _open_run(self, resume_from: Path | None, on_start: Callable[[], None] | None) -> MetricsLogger | _NullLogger:
        """Restore the checkpoint (refusing a finished run before anything is rewritten), make the
        run folder ready on rank 0, and open the metrics."""
        if resume_from is not None:
            refuse_finished(resume_from, self.run_dir, self.cfg.budget, self.task.unit)
            self._restore(resume_from)
        if self.dist.main:
            check_writable(self.run_dir / "checkpoints", "the checkpoint folder")  # before the first step, not at the first save
            for partial in (self.run_dir / "checkpoints").glob(".step_*.partial"):  # left by a killed process
                shutil.rmtree(partial, ignore_errors=True)
            if on_start is not None:
                on_start()
        distributed.barrier()  # the run folder is ready before any rank trains
        self.run_dir_made = True
        if not self.dist.main:
            return _NullLogger()
        return MetricsLogger(self.run_dir, resume_step=self.step if resume_from is not None else None,
                             wandb=self.cfg.wandb, config=self._saved_config())

    def _due(self) -> "Due":
        """What this step boundary owes: a training-loss record (also after the warm-up step),
        and the evaluation, samples and checkpoint whose cadence it crosses (all at the last step)."""
        last, cfg = self.step == self.total_steps, self.cfg
        return Due(log=self.timer.warming or self.step % cfg.log_every == 0 or last,
                   eval=self._crossed(cfg.eval_every) or last, sample=self._crossed(cfg.sample_every) or last,
                   checkpoint=self._crossed(cfg.ckpt_every) or last)

    def _check_finite(self) -> None:
        if distributed.any_across(self.nonfinite).item():  # set on the device by any step since the last check
            raise UserError(f"training diverged: a non-finite loss or gradient norm by step {self.step}; "
                            "no checkpoint of it was written (train.on_nonfinite=\"skip\" skips such steps)")

    def _log_train(self, logger: MetricsLogger, bar, loss: float, grad_norm: torch.Tensor) -> None:
        unit, rate = self.task.unit, self.timer.rate()
        extra = self.task.train_metrics(self.model)
        logger.log(self.step, "train", units=self.step * self.units_per_step, loss=loss, grad_norm=grad_norm.item(),
                   lr_mult=lr_multiplier(self.step - 1, self.total_steps, self.optim_cfg), **{f"{unit}_per_s": rate},
                   **extra, **({"ema_decay": self.ema.last_decay} if self.ema is not None else {}))
        bar.set_postfix({"loss": f"{loss:.4f}", f"{unit}/s": f"{rate:,.0f}"})

    def _saved_config(self) -> dict | None:
        """The resolved config the script saved in the run folder (what W&B records), if any."""
        path = self.run_dir / "config.toml"
        return load_toml(path) if self.cfg.wandb and path.is_file() else None

    def _stop(self, bar, logger) -> None:
        """Ctrl-C or SIGTERM asked to stop: checkpoint at this step boundary and leave."""
        bar.close()
        path = self.save()
        logger.close()
        print(f"interrupted at step {self.step}: saved {path}; continue with --resume", flush=True)
        raise KeyboardInterrupt

    def _stop_agreed(self) -> bool:
        flag = torch.tensor(self.stop_requested, device=self.device)
        return bool(distributed.any_across(flag))

    def _finish(self, eval_metrics: dict) -> dict:
        eval_metrics = distributed.from_main(eval_metrics)  # DDP evaluates on rank 0 only; every rank reports it
        units = self.step * self.units_per_step
        unit = self.task.unit
        summary = {
            "steps": self.step,
            "unit": unit,
            unit: units,
            "params": count_params(self.model),
            "train_time_s": round(self.timer.train_time, 3),
            "compile_warmup_s": round(self.timer.warmup_time, 3),
            f"{unit}_per_s": round(self.timer.units / self.timer.train_time, 1) if self.timer.train_time > 0 else None,
            # ranks on one node would count each other as other processes
            "cpu_others": self.timer.others.share() if self.dist.local_world == 1 else None,
            "freed_memory_kept": self.kept_memory,  # shared/cpumem.py: a CPU run's speed depends on it
            "final_eval": eval_metrics,
            "skipped_steps": self.skipped,
            "ema_decay": self.ema.last_decay if self.ema is not None else None,  # the decay of the last update
            "precision": str(self.dtype).removeprefix("torch."),
            "tf32": self.tf32,
            "compile": self.cfg.compile,
            "world_size": self.dist.world,
            "parallel": ("fsdp" if self.sharded else "ddp") if self.dist.active else "none",
            "hardware": hardware_info(self.device),
        }
        if self.device.type == "cuda":
            summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self._check_run_dir()
        if not self.dist.main:
            return summary
        write_file_atomic(self.run_dir / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"),
                          "the summary")
        png = self.run_dir / "loss_curve.png"
        try:
            plot_loss_curve(self.run_dir / "metrics.jsonl", png, x_key="units", x_label=unit)
        except WRITE_ERRORS as e:
            png.unlink(missing_ok=True)
            raise UserError(f"could not write the loss curve {png} ({write_failure(e, self.run_dir)})") from None
        return summary


def refuse_finished(resume: Path | None, run_dir: Path, budget: int, unit: str) -> None:
    """Refuse to resume a run that already reached its budget. Scripts may call it early, before
    expensive preparation (encoding a data set); the trainer calls it on every resume."""
    if resume is None:
        return
    state = load_state(resume)
    done = int(state["step"]) * int(state["units_per_step"])
    if done >= budget:
        raise UserError(f"{run_dir} already reached its budget ({done:,} {unit}); raise train.budget to continue it")


class _NullLogger:
    """What ranks other than 0 log to."""

    def log(self, *args, **kwargs) -> None: ...
    def add_text(self, *args, **kwargs) -> None: ...
    def add_image(self, *args, **kwargs) -> None: ...
    def close(self) -> None: ...


@contextlib.contextmanager
def _output_folder(run_dir: Path, main: bool):
    """The run folder on rank 0; a scratch folder on the others (under FSDP every rank runs the
    sample hook, whose forward passes need them all, but only rank 0's files are kept)."""
    if main:
        yield run_dir
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


class _stop_on_interrupt:
    """The first Ctrl-C or SIGTERM (what schedulers and `docker stop` send) asks the loop to stop
    cleanly at the next step boundary (a checkpoint taken mid-step could not resume exactly); a
    second one interrupts at once."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.previous = trainer, None

    def _handler(self, signum, frame):
        if self.trainer.stop_requested:
            raise KeyboardInterrupt
        self.trainer.stop_requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step (again to abort without a checkpoint)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in (self.previous or {}).items():
            signal.signal(s, handler)
        return False
