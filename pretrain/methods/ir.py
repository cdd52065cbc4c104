"""Instance discrimination with a memory bank (Wu et al., CVPR 2018), plain and ring.

One augmented view per image; its embedding is contrasted with its own bank entry (the
positive) and negatives from the bank: ``num_negatives`` drawn uniformly (shared by the batch, or
one draw per anchor with ``ir.shared_negatives: false`` as the official ring code does) for NCE,
or -- ring variant -- drawn per anchor from the ring of the whole bank ranked by similarity
to the anchor (the anchor's own entry ranks first and falls in the inner cut).
After the step the bank entries of the batch move towards the new embeddings (momentum 0.5; the
official ring code uses 0: the entry becomes the new embedding). Head: one linear layer, or the
official code's 2-layer MLP with ``ir.mlp: true``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.methods.base import MOMENTUM, POSITIVE, Encoder, MemoryBank, Method, in_range
from pretrain.methods.registry import register_method


@dataclass
class IRConfig:
    bank_momentum: float = in_range(0.5, *MOMENTUM)
    num_negatives: int = in_range(4096, *POSITIVE)
    head_dim: int = in_range(128, *POSITIVE)
    mlp: bool = False  # 2-layer MLP head (the official ring code's model) instead of one linear layer
    shared_negatives: bool = True  # one draw for the whole batch; false: a draw per anchor (official)


@register_method
class InstanceDiscrimination(Method):
    name = "ir"
    accepted_losses = ("nce", "ring")
    config_section = IRConfig
    views = 1

    def __init__(self, cfg, dataset_size: int, stem: str, mean=None, std=None) -> None:
        super().__init__(cfg, dataset_size, stem, mean, std)
        ic = cfg["ir"]
        self.encoder = Encoder(cfg["arch"], stem, ic["head_dim"], mlp=ic["mlp"])
        self.shared_negatives = bool(ic["shared_negatives"])
        # A draw per anchor is with replacement from the whole bank (as the official code draws), so
        # only the shared draw is capped at the bank's size.
        self.num_negatives = int(ic["num_negatives"])
        if self.shared_negatives:
            self.num_negatives = min(self.num_negatives, dataset_size)
        self.bank = MemoryBank(dataset_size, ic["head_dim"], ic["bank_momentum"], seed=self.seed)

    def ring_pool_size(self, world_size: int = 1) -> int:
        return len(self.bank)

    def training_step(self, views, index):
        z = self.encoder(views[0])
        positives = self.bank.memory[index].detach()
        if self.loss_cfg["name"] == "ring":
            samples = self.loss_cfg["num_samples"] or self.num_negatives
            loss = self.contrast(z, positives, self.bank.memory.detach(), num_samples=samples)
        else:
            negatives = self.bank.sample(self.num_negatives, self.generator, None if self.shared_negatives else len(z))
            loss = self.contrast(z, positives, negatives)
        self.bank.update(index, z.detach())
        return loss, {"loss": loss.detach().item()}
