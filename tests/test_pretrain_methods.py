"""One step of each method on tiny CPU inputs: losses, momentum encoders, queues, memory banks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.methods import build_method
from pretrain.seeds import METHOD, stream_seed


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 spinning OpenMP threads per process thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = [
    "data.synthetic_image_size=16",
    "train.batch_size=8",
    "moco.queue_size=32",
    "moco.shuffle_groups=2",
    "ir.num_negatives=16",
    "loss.w_outer=0.5",
    "loss.w_inner=0.25",
]


def tiny_method(*overrides: str, dataset_size: int = 40):
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY, *overrides])
    method = build_method(cfg, dataset_size, "cifar")
    method.set_epoch(0)
    return method


def _views(n: int = 2, batch: int = 8, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


@pytest.mark.parametrize("loss", ["nce", "ring"])
def test_moco_step(loss):
    method = tiny_method("method=moco", f"loss.name={loss}")
    before_q = copy.deepcopy(method.encoder.state_dict())
    before_k = copy.deepcopy(method.key_encoder.state_dict())
    queue = method.queue.clone()
    views = _views()
    out, logs = method.training_step(views, torch.arange(8))
    assert torch.isfinite(out) and logs["loss"] == pytest.approx(out.item())
    out.backward()
    assert all(p.grad is not None for p in method.encoder.parameters())
    assert all(p.grad is None for p in method.key_encoder.parameters())
    # EMA: k <- m k + (1 - m) q, with the query weights as they were at the step
    m = method.momentum
    for name, p_k in method.key_encoder.named_parameters():
        assert torch.allclose(p_k, m * before_k[name] + (1 - m) * before_q[name], atol=1e-6)
    # the batch's keys replaced the 8 oldest queue entries
    assert int(method.queue_ptr) == 8
    assert torch.equal(method.queue[8:], queue[8:]) and not torch.allclose(method.queue[:8], queue[:8])
    assert torch.allclose(method.queue[:8].norm(dim=1), torch.ones(8), atol=1e-5)


def test_moco_queue_wraps_around():
    method = tiny_method("method=moco", dataset_size=24)  # queue capped at half the dataset
    assert len(method.queue) == 12
    for seed in range(2):
        method.training_step(_views(seed=seed), torch.arange(8))
    assert int(method.queue_ptr) == 4


def test_moco_shuffled_bn_uses_separate_group_statistics():
    method = tiny_method("method=moco")
    x = _views(1)[0]
    enc = copy.deepcopy(method.key_encoder)
    method.set_epoch(0)
    keys = method.keys(x)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(stream_seed(method.seed, METHOD, 0)))
    shuffled = x[perm]
    want = torch.cat([enc(shuffled[:4]), enc(shuffled[4:])])[torch.argsort(perm)]
    assert torch.allclose(keys, want, atol=1e-5)
    assert not torch.allclose(keys, enc(x), atol=1e-3)  # whole-batch BN would differ


@pytest.mark.parametrize("loss", ["nce", "ring"])
def test_ir_step_and_bank_update(loss):
    method = tiny_method("method=ir", f"loss.name={loss}", "loss.num_samples=10")
    bank = method.bank.memory.clone()
    index = torch.tensor([3, 7, 11, 0, 39, 20, 21, 5])
    x = _views(1)
    out, _ = method.training_step(x, index)
    assert torch.isfinite(out)
    out.backward()
    assert all(p.grad is not None for p in method.encoder.parameters())
    with torch.no_grad():
        method.eval()
        z = method.encoder.train()(x[0])
    expected = F.normalize(0.5 * bank[index] + 0.5 * z, dim=1)
    assert torch.allclose(method.bank.memory[index], expected, atol=1e-4)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(method.bank.memory[untouched], bank[untouched])


def test_ir_ring_loss_uses_bank_ring():
    method = tiny_method("method=ir", "loss.name=ring", "loss.num_samples=10")
    x, index = _views(1), torch.arange(8)
    bank = method.bank.memory.clone()
    method.set_epoch(0)
    out, _ = method.training_step(x, index)
    from pretrain.losses import ring_loss

    torch.manual_seed(0)
    ref = tiny_method("method=ir", "loss.name=ring", "loss.num_samples=10")
    z = ref.encoder(x[0])
    want = ring_loss(
        z,
        bank[index],
        bank,
        0.07,
        0.5,
        0.25,
        num_samples=10,
        generator=torch.Generator().manual_seed(stream_seed(ref.seed, METHOD, 0)),
    )
    assert out.item() == pytest.approx(want.item(), rel=1e-5)


def test_ring_schedule_applied_per_epoch():
    method = tiny_method("method=moco", "loss.schedule=linear", "loss.w_outer=0.2", "loss.anneal_epochs=10")
    method.set_epoch(0)
    assert method.w_outer == pytest.approx(1.0)
    method.set_epoch(5)
    assert method.w_outer == pytest.approx(0.6)
    assert method.loss_params()["schedule"] == "linear" and method.loss_params()["w_outer"] == 0.2
