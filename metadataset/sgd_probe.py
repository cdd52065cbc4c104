"""BSCD-FSL's frozen-feature baseline as a probe: a linear layer trained by SGD on the support features.

Source: Guo et al., "A Broader Study of Cross-Domain Few-Shot Learning" (ECCV 2020), ``IBM/cdfsl-benchmark``
``finetune.py`` with ``--freeze_backbone``: per episode a fresh ``nn.Linear(D, ways)`` (PyTorch's default
initialisation, ``U(-1/sqrt(D), 1/sqrt(D))`` for weight and bias), cross-entropy averaged over a minibatch of 4
support examples, ``torch.optim.SGD(lr=0.01, momentum=0.9, dampening=0.9, weight_decay=1e-3)``, 100 epochs,
each over a fresh random permutation of the support set cut into minibatches of 4 (the last one smaller);
queries scored by the raw features' logits (no normalisation of the features).

Here every episode of a call is trained at once: one tensor program whose every step updates the ``E``
episodes' classifiers with batched products, each episode with its own initial weights and permutations.
Episodes with fewer support examples (variable-way episodes) are padded and simply do not step once their
epoch is over, exactly as their own loop would stop. The SGD step is PyTorch's (``torch.optim.SGD``): weight
decay added to the gradient, the momentum buffer the first gradient itself, then ``b <- m b + (1 - d) g``,
``p <- p - lr b``. An episode's random numbers (initial weights, then one permutation per epoch) come from
``numpy.random.default_rng([seed, *key])``, ``key`` the episode's identity that :func:`metadataset.evaluate.
evaluate_source` passes (its episodes' seed and its index): the same for every card on the same episode, so two
cards' accuracies pair on the initial weights and minibatches as well as on the images. Without keys (one call by
hand) the key is a checksum of the support features and labels. Either way a function of the episode alone, the
same however episodes are grouped.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from metadataset.episode_batch import remap_labels_many, stack_padded
from ringbench.errors import UserError
from ringbench.logreg import few_threads_if_small

MASKED = -1e30  # the logit of a class an episode does not have (padding)


@dataclass(frozen=True)
class EpisodeRandomness:
    """One episode's draws: initial ``weight (K, D)``, ``bias (K,)`` and ``permutations (epochs, n)``."""

    weight: np.ndarray
    bias: np.ndarray
    permutations: np.ndarray


def episode_randomness(
    support_x: np.ndarray,
    support_y: np.ndarray,
    ways: int,
    epochs: int,
    seed: int,
    key: Sequence[int] | None = None,
) -> EpisodeRandomness:
    """The episode's initial classifier (``nn.Linear``'s default law) and its epochs' permutations, drawn from
    ``(seed, *key)`` (``key``: the episode's identity; None: a checksum of its support set)."""
    support_x = np.ascontiguousarray(support_x, dtype=np.float32)
    if key is None:
        key = (zlib.crc32(support_x.tobytes()), zlib.crc32(np.ascontiguousarray(support_y).tobytes()))
    rng = np.random.default_rng([int(seed), *(int(k) for k in key)])
    dim = support_x.shape[1]
    bound = 1.0 / np.sqrt(dim)
    weight = rng.uniform(-bound, bound, size=(ways, dim))
    bias = rng.uniform(-bound, bound, size=ways)
    perms = np.stack([rng.permutation(len(support_y)) for _ in range(epochs)]) if epochs else np.zeros((0, 0))
    return EpisodeRandomness(weight, bias, perms.astype(np.int64))


@dataclass
class SGDLinearProbe:
    """BSCD-FSL's linear classifier on frozen support features (module docstring), batched over episodes."""

    epochs: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    weight_decay: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # float64 for exact comparisons with a reference loop
    name: str = field(default="sgd_linear", init=False)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError(f"sgd_linear: epochs and batch size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not (self.lr > 0 and 0 <= self.momentum < 1 and 0 <= self.dampening <= 1 and self.weight_decay >= 0):
            raise UserError("sgd_linear: needs lr > 0, momentum in [0, 1), dampening in [0, 1], weight decay >= 0")
        if self.dtype not in ("float32", "float64"):
            raise UserError(f"sgd_linear: dtype must be float32 or float64, got {self.dtype!r}")

    def config(self) -> dict[str, Any]:
        return {
            "probe": self.name,
            "epochs": self.epochs,
            "lr": self.lr,
            "momentum": self.momentum,
            "dampening": self.dampening,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def fit_predict(self, support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray) -> np.ndarray:
        return self.fit_predict_many([(support_x, support_y, query_x)])[0]

    def fit_predict_many(
        self,
        tasks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
        keys: Sequence[Sequence[int]] | None = None,
    ) -> list[np.ndarray]:
        """Predictions for many episodes; ``keys[i]``: episode ``i``'s identity, which seeds its random numbers."""
        if not tasks:
            return []
        if keys is not None and len(keys) != len(tasks):
            raise ValueError(f"{len(keys)} episode keys for {len(tasks)} episodes")
        remapped = remap_labels_many([sy for _, sy, _ in tasks])
        ways = max(len(classes) for classes, _ in remapped)
        draws = [
            episode_randomness(sx, codes, len(classes), self.epochs, self.seed, None if keys is None else keys[i])
            for i, ((sx, _, _), (classes, codes)) in enumerate(zip(tasks, remapped))
        ]
        weight, bias = self.train(
            [t[0] for t in tasks], [codes for _, codes in remapped], draws, ways, [len(c) for c, _ in remapped]
        )
        weight_np, bias_np = weight.cpu().numpy(), bias.cpu().numpy()
        out: list[np.ndarray] = []
        for i, (_, _, qx) in enumerate(tasks):
            k = len(remapped[i][0])
            logits = np.asarray(qx).astype(weight_np.dtype, copy=False) @ weight_np[i, :k].T + bias_np[i, :k]
            out.append(remapped[i][0][logits.argmax(1)])
        return out

    def train(
        self,
        support: Sequence[np.ndarray],
        codes: Sequence[np.ndarray],
        draws: Sequence[EpisodeRandomness],
        ways: int,
        present: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The trained ``weight (E, K, D)`` and ``bias (E, K)`` of every episode (classes ``>= present[e]`` are
        padding: masked out of the softmax). One step of the loop is one minibatch of every episode.

        In span coordinates: every gradient of the weight is ``R^T X_batch + wd W`` (``X`` the support rows), so
        the weight and its momentum buffer stay ``a W0 + A X`` and ``c W0 + M X`` (``a``, ``c`` scalars, ``A``,
        ``M`` of shape ``(K, n)``). The loop updates ``(a, A, c, M, b)`` from the Gram matrix ``X X^T`` and
        ``X W0^T``, never touching a ``D``-wide array; ``W = a W0 + A X`` at the end (exact, up to rounding)."""
        dtype = getattr(torch, self.dtype)
        dev = self.device
        e, n, d = len(support), max(len(labels) for labels in codes), support[0].shape[1]
        x = torch.from_numpy(stack_padded([np.asarray(s) for s in support], n, d)).to(dev, dtype)
        y = torch.zeros(e, n, dtype=torch.int64, device=dev)
        sizes = torch.tensor([len(labels) for labels in codes], device=dev)
        perms = torch.zeros(e, self.epochs, n, dtype=torch.int64, device=dev)
        weight0 = torch.zeros(e, ways, d, dtype=dtype, device=dev)
        bias = torch.zeros(e, ways, dtype=dtype, device=dev)
        class_ok = torch.zeros(e, ways, dtype=torch.bool, device=dev)
        for i, (labels, draw) in enumerate(zip(codes, draws)):
            y[i, : len(labels)] = torch.from_numpy(np.asarray(labels, dtype=np.int64))
            perms[i, :, : len(labels)] = torch.from_numpy(draw.permutations)
            weight0[i, : present[i]] = torch.from_numpy(draw.weight).to(dtype)
            bias[i, : present[i]] = torch.from_numpy(draw.bias).to(dtype)
            class_ok[i, : present[i]] = True
        gram = x @ x.transpose(1, 2)  # (E, n, n)
        start_scores = x @ weight0.transpose(1, 2)  # X W0^T, (E, n, K)
        masked = (~class_ok).any().item()
        a = torch.ones(e, 1, 1, dtype=dtype, device=dev)
        coef = torch.zeros(e, ways, n, dtype=dtype, device=dev)  # A
        buf_a, buf, buf_b = torch.zeros_like(a), torch.zeros_like(coef), torch.zeros_like(bias)
        rows = torch.arange(e, device=dev)[:, None]
        offsets = torch.arange(self.batch_size, device=dev)
        wd, m, keep = self.weight_decay, self.momentum, 1 - self.dampening
        first = True
        with few_threads_if_small(coef.numel()):  # many small steps: thread synchronisation would dominate
            for epoch in range(self.epochs):
                for begin in range(0, n, self.batch_size):
                    position = begin + offsets[: min(self.batch_size, n - begin)]  # (B,)
                    member = (position[None, :] < sizes[:, None]).to(dtype)  # (E, B): real examples
                    index = perms[:, epoch, position]  # (E, B)
                    logits = torch.baddbmm(bias[:, None, :], gram[rows, index], coef.transpose(1, 2))
                    logits += a * start_scores[rows, index]
                    if masked:
                        logits = logits.masked_fill(~class_ok[:, None, :], MASKED)
                    resid = torch.softmax(logits, -1)
                    resid[rows, torch.arange(len(position), device=dev)[None, :], y[rows, index]] -= 1.0
                    resid *= (member / member.sum(1, keepdim=True).clamp_min(1))[..., None]  # mean over the batch
                    spread = index[:, None, :].expand(-1, ways, -1)  # where each example's residual goes in A
                    on = sizes > begin  # (E,): the episodes with a minibatch left in this epoch
                    every = bool(on.all())
                    if first or m == 0:  # torch.optim.SGD: the buffer starts as the first gradient
                        moved = torch.zeros_like(coef).scatter_add_(2, spread, resid.transpose(1, 2))
                        moved.add_(coef, alpha=wd)
                        moved_a, moved_b = wd * a, resid.sum(1) + wd * bias
                    else:  # m M + (1 - d) (scatter(R) + wd A), in place when every episode steps
                        moved = buf.mul_(m) if every else m * buf
                        moved.add_(coef, alpha=keep * wd).scatter_add_(2, spread, keep * resid.transpose(1, 2))
                        moved_a = m * buf_a + keep * wd * a
                        moved_b = m * buf_b + keep * (resid.sum(1) + wd * bias)
                    first = False
                    if every:
                        buf, buf_a, buf_b = moved, moved_a, moved_b
                        coef.add_(buf, alpha=-self.lr)
                        a, bias = a - self.lr * buf_a, bias - self.lr * buf_b
                    else:  # the others neither step nor move their buffers, as their own loop would not
                        on3, on2 = on[:, None, None], on[:, None]
                        buf, buf_a, buf_b = (
                            torch.where(on3, moved, buf),
                            torch.where(on3, moved_a, buf_a),
                            torch.where(on2, moved_b, buf_b),
                        )
                        step = self.lr * on.to(dtype)
                        coef = coef - step[:, None, None] * buf
                        a, bias = a - step[:, None, None] * buf_a, bias - step[:, None] * buf_b
        return a * weight0 + coef @ x, bias
