"""FT baseline: fine-tune the edited layer's weight on the fact (as the reference harness's MMFT).

Adam (lr 0.01, eps 1e-4) on the weight of the same layer the codebook methods wrap, for a fixed
number of steps, cross-entropy on the answer tokens + end-of-sequence of the edit input (and of
its rephrasings when `train_on_rephrases`). Nothing else constrains the update, so every input
sees it. `reset` copies the original weight back; `close` does too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from editor.backbones import Backbone, Query
from editor.eval.hparams import FineTuneConfig
from editor.eval.methods import WeightMethod
from editor.eval.readout import Readout
from editor.fact import Fact


def answer_logits(
    backbone: Backbone, batch_inputs: dict[str, torch.Tensor], key_positions: torch.Tensor, length: int
) -> torch.Tensor:
    """Logits at the answer positions of a teacher-forced batch. -> (B, L, V)"""
    logits = backbone.model(**batch_inputs, use_cache=False).logits  # (B, T, V)
    positions = key_positions.to(logits.device).unsqueeze(1) + torch.arange(
        length, device=logits.device
    )  # (B, L)
    index = positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # (B, L, V)
    return logits.gather(1, index).float()


class FineTune(WeightMethod):
    name = "ft"

    def __init__(self, backbone: Backbone, config: FineTuneConfig, layer: str | None = None) -> None:
        self.backbone = backbone
        self.config = config
        self.layer_path = layer or backbone.default_layer
        module = backbone.model.get_submodule(self.layer_path)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise TypeError(f"layer {self.layer_path!r} has no weight parameter to fine-tune")
        self.weight = weight
        self.original = weight.detach().clone()
        self.readout = Readout(backbone, config.max_new_tokens)
        self.setup: dict[str, Any] = {"layer": self.layer_path}

    def apply(self, fact: Fact) -> dict[str, Any]:
        config = self.config
        query = self.backbone.query(fact.image, fact.question)
        rows = [query] + (
            [Query(query.image, q) for q in fact.rephrases] if config.train_on_rephrases else []
        )
        batch = self.backbone.encode(rows, [fact.answer] * len(rows))
        assert batch.targets is not None
        targets = batch.targets.to(self.backbone.device)  # (B, L)
        inputs = self.backbone.model_inputs(batch)
        optimiser = torch.optim.Adam(
            [self.weight], lr=config.lr, weight_decay=config.weight_decay, eps=config.adam_eps
        )
        losses: list[float] = []
        self.weight.requires_grad_(True)
        try:
            with torch.enable_grad():
                for _ in range(config.max_steps):
                    optimiser.zero_grad(set_to_none=True)
                    logits = answer_logits(self.backbone, inputs, batch.key_positions, targets.shape[1])
                    loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
                    loss.backward()
                    optimiser.step()
                    losses.append(loss.item())
                    if loss.item() < config.loss_threshold:
                        break
        finally:
            self.weight.requires_grad_(False)
            self.weight.grad = None
        change = float((self.weight.detach() - self.original).norm())
        return {
            "steps": len(losses),
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "weight_change_norm": change,
        }
