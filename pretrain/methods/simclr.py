"""SimCLR (Chen et al. 2020) with in-batch negatives: NT-Xent, the ring over the batch, hard
negatives (HCL, Robinson et al. 2021) and debiased negatives (DCL, Chuang et al. 2020).

Two views per image through one encoder and a 2-layer MLP head (batch norm after the hidden
layer, as the HCL reference) to 128-d; each of the ``2B``
embeddings is an anchor whose positive is its other view and whose negatives are the other
``2B - 2`` embeddings of the global batch: on several processes the embeddings are gathered with
their gradients and each process computes the loss of its own anchors, so that the step is the
one-process step on the whole batch (SimCLR's cross-replica negatives). Batch norm is synchronised
across GPUs (SimCLR's global BN; not on CPU, where PyTorch has no SyncBatchNorm). HCL's ``beta``
can be annealed to 0 over ``loss.beta_anneal_epochs``: linearly per epoch, or in
``loss.beta_anneal_steps`` steps as HCL's ``--anneal down`` does (:func:`hcl_beta`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pretrain import distributed as dist
from pretrain import losses
from pretrain.methods.base import POSITIVE, Encoder, Method, in_range
from pretrain.methods.registry import register_method
from ringbench.errors import UserError


@dataclass
class SimCLRConfig:
    head_dim: int = in_range(128, *POSITIVE)
    hidden_dim: int = in_range(512, *POSITIVE)


@register_method
class SimCLR(Method):
    name = "simclr"
    accepted_losses = ("ntxent", "ring", "hcl", "dcl")
    config_section = SimCLRConfig
    views = 2
    sync_batchnorm = True

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        if cfg["train"]["batch_size"] < 2:
            raise UserError("config: SimCLR needs train.batch_size >= 2 (in-batch negatives)")

    def __init__(self, cfg, dataset_size: int, stem: str, mean=None, std=None) -> None:
        super().__init__(cfg, dataset_size, stem, mean, std)
        sc = cfg["simclr"]
        self.encoder = Encoder(cfg["arch"], stem, sc["head_dim"], hidden_dim=sc["hidden_dim"], mlp=True, bn=True)
        self.beta = float(self.loss_cfg["beta"])

    def ring_pool_size(self, world_size: int = 1) -> int:
        return 2 * self.cfg["train"]["batch_size"] - 2  # negatives come from the global batch

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        lc = self.loss_cfg
        self.beta = hcl_beta(epoch, lc["beta"], lc["beta_anneal_epochs"], lc["beta_anneal_steps"])

    def training_step(self, views, index):
        z1, z2 = self.encoder(views[0]), self.encoder(views[1])
        rows = None
        if dist.world_size() > 1:  # this process's anchors against the whole batch
            local, total = len(z1), len(z1) * dist.world_size()
            mine = dist.local_rows(local).to(z1.device)
            rows = torch.cat([mine, mine + total])  # view-1 anchors, then view-2 anchors
            z1, z2 = dist.all_gather_with_grad(z1), dist.all_gather_with_grad(z2)
        lc = self.loss_cfg
        if lc["name"] == "ring":
            loss = losses.in_batch_ring_loss(
                z1,
                z2,
                lc["t"],
                self.w_outer,
                lc["w_inner"],
                lc["num_samples"],
                self.generator,
                lc["rounding"],
                rows,
            )
        elif lc["name"] == "hcl":
            loss = losses.hcl_loss(z1, z2, lc["t"], lc["tau_plus"], self.beta, lc["estimator"], rows)
        elif lc["name"] == "dcl":
            loss = losses.dcl_loss(z1, z2, lc["t"], lc["tau_plus"], rows)
        else:
            loss = losses.nt_xent_loss(z1, z2, lc["t"], rows)
        return loss, {"loss": loss.detach().item()}


def hcl_beta(epoch: int, beta: float, anneal_epochs: int, steps: int = 0) -> float:
    """HCL's ``beta`` during (0-based) ``epoch``.

    ``anneal_epochs = 0``: constant. ``steps = 0``: linear from ``beta`` to 0 over ``anneal_epochs``.
    ``steps = n``: HCL's ``--anneal down`` (``image/main.py``): after every ``int(anneal_epochs / n)``-th
    epoch beta moves to the next value of ``linspace(beta, 0, n)``, whose first value is ``beta``
    itself, so the first change comes after ``2 * int(anneal_epochs / n)`` epochs.
    """
    if not anneal_epochs:
        return float(beta)
    if not steps:
        return float(beta) * max(0.0, 1.0 - epoch / anneal_epochs)
    period = max(1, int(anneal_epochs / steps))
    taken = min(epoch // period, steps)  # values drawn before this epoch
    return float(np.linspace(beta, 0.0, steps)[max(taken - 1, 0)])
