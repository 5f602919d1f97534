"""A training step of every trainer makes no host synchronisation (CPU, seconds).

The trainer reads the device only at logging points, so between them the GPU can run ahead; one
`.item()`, `bool(t)`, `nonzero` or boolean-mask index inside a step (the model, the task's loss,
the batch source, the optimiser) would stall it every step. SyncCounter (shared/syncs.py) counts
those ops on any device, so these CPU tests hold the promise for CUDA as well; copies between host
and GPU it sees only on a GPU, where tests/test_gpu.py runs the same steps (`pytest -m gpu`).
Each trainer comes from tests/trainers.py and trains one step first (which may sync: the VQ-VAE's
codebook is initialised by k-means then); the next steps must count zero.
"""

from __future__ import annotations

import pytest

from shared.syncs import SyncCounter
from shared.trainer import Trainer
from trainers import MOE, NANOCHAT, classifier_trainer, flow_matching_trainer, llm_trainer, multimodal_trainer, vqvae_trainer

pytestmark = [pytest.mark.gpu_paths, pytest.mark.usefixtures("one_thread")]

STEPS = 2  # steps counted after the first


def count_syncs(trainer: Trainer, steps: int = STEPS) -> SyncCounter:
    trainer.model.train()
    trainer.train_step()  # the first step may sync (lazy initialisation)
    with SyncCounter() as counter:
        for _ in range(steps):
            trainer.train_step()
    return counter


def assert_no_syncs(counter: SyncCounter) -> None:
    assert counter.total == 0, f"{counter.total} host syncs in {STEPS} training steps: {dict(counter.counts)}"


# ------------------------------------------------------------------------------- LLM


@pytest.mark.parametrize("overrides", [(), ("data.doc_mask=true",), ("model.loss_chunk=64", "model.logit_softcap=15.0"),
                                       (*MOE, "model.moe.bias_rate=0.001"), (*MOE, "model.moe.capacity_factor=1.25"),
                                       tuple(NANOCHAT)],
                         ids=["dense", "doc-mask", "chunked-loss", "moe-bias", "moe-capacity", "nanochat-options"])
def test_llm_step_has_no_host_syncs(tmp_path, overrides):
    """Dense, with document masks and with the chunked loss; MoE dropless with its balancing bias and with
    a capacity. Before: 10 syncs a step from AdamW's single-tensor path (a step count read per
    parameter), 4 more from MoE's bincount."""
    assert_no_syncs(count_syncs(llm_trainer(tmp_path, *overrides)))


# ------------------------------------------------------------------------------- VQ-VAE


# a batch of 8 images is 512 vectors for 128 codes, 4 per code: a threshold of 4 keeps about half
# of the codes dead every step, so the replacement always has work to do
@pytest.mark.parametrize("overrides", [
    ("model.dead_threshold=4.0",),
    ("model.dead_threshold=4.0", 'model.dead_reseed="farthest"'),
    ("model.dead_threshold=4.0", "model.l2_codes=true", 'model.gradient="rotation"'),
    ('model.codebook_update="loss"',),
    ("gan.weight=0.1", "gan.start=1", "gan.adaptive=true", "gan.channels=8"),
], ids=["random-reseed", "farthest-reseed", "l2-rotation", "loss-codebook", "gan"])
def test_vqvae_step_has_no_host_syncs(tmp_path, overrides):
    trainer = vqvae_trainer(tmp_path, *overrides)
    assert_no_syncs(count_syncs(trainer))
    # what the counted steps did, read after counting: codes were replaced, the adversarial term ran
    q = trainer.model.quantizer
    if q.dead_threshold >= 4:
        assert int(q.replaced) > 0
    if trainer.model.discriminator is not None:
        assert len(trainer.task._gan_stats) == STEPS


# ------------------------------------------------------------------------------- multimodal


def test_multimodal_step_has_no_host_syncs(tmp_path):
    trainer = multimodal_trainer(tmp_path, "loss.text_weight=0.5")
    assert_no_syncs(count_syncs(trainer))
    # the loss weights live on the model's device, moved there once (a CPU tensor would be copied
    # to the GPU every micro-batch, a blocking copy from pageable memory)
    assert [w.device.type for w in trainer.task._weights.values()] == [trainer.device.type]


# ------------------------------------------------------------------------------- flow matching


@pytest.mark.parametrize("overrides", [(), ("flow.uniform_mix=0.1",)], ids=["logit-normal", "uniform-mix"])
def test_flow_matching_step_has_no_host_syncs(tmp_path, overrides):
    assert_no_syncs(count_syncs(flow_matching_trainer(tmp_path, *overrides)))


# ------------------------------------------------------------------------------- classifier


# airbench: the whitening stem, held filter norms, alternating flips and Nesterov SGD, narrowed
@pytest.mark.parametrize("preset, overrides", [("debug", ()), ("airbench", ("model.width=8",))])
def test_classifier_step_has_no_host_syncs(tmp_path, preset, overrides):
    assert_no_syncs(count_syncs(classifier_trainer(tmp_path, preset, *overrides)))
