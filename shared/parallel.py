"""Data parallelism for the trainer: DDP for every model, FSDP2 (`fully_shard`) for transformer
stacks, and the full (unsharded) state dicts that checkpoints hold either way, so a checkpoint
resumes under any world size and either mode's weights load anywhere."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError

Mode = Literal["ddp", "fsdp"]


class DDP(DistributedDataParallel):
    """DDP whose attributes fall through to the wrapped model: tasks read `model.cfg`,
    `model.null_class` and the like from what the trainer hands them."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def shard(model: nn.Module) -> None:
    """FSDP2 in place: each block is one unit (its weights gathered just before it runs and freed
    after), the rest (embeddings, final norm, head) is the root unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"train.parallel='fsdp' needs a transformer with `blocks` ({type(model).__name__} has none); use 'ddp'")
    # weights stay fp32 (the trainer's autocast does the bf16 compute); gradients reduce in fp32
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded result (the gradient norm under FSDP) as an ordinary tensor."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP without its buffer broadcast: by default it copies rank 0's buffers to every rank
    before each forward (a collective per step), which re-sends constant tables (RoPE) and
    overwrites state that each rank keeps on purpose (MoE load counts, summed across ranks when
    the balancing bias moves). Buffers that must agree are synchronised by their owners (the VQ
    codebook from every rank's vectors); BatchNorm statistics are rank 0's, as before, since
    only rank 0 evaluates and saves."""
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """The root unit's weights whole for code that calls model methods other than forward
    (evaluation reads `hidden` and `lm_head`); the blocks gather themselves as they run."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


@contextlib.contextmanager
def accumulating(forward_model: nn.Module, model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        yield
    elif not sync and hasattr(forward_model, "no_sync"):
        with forward_model.no_sync():
            yield
    else:
        yield


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors (on rank 0 for a sharded model; a collective: every rank calls it)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_model_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Full tensors into a sharded model (each rank keeps its shard); missing keys are tied aliases,
    which the caller has checked."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, tensors, options=_options(strict=False))


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    if not is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, by_name: bool) -> None:
    """`by_name`: the state was gathered from a sharded model (keyed by parameter name), which
    loads into a sharded or a whole model alike."""
    if not by_name:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=_options())
