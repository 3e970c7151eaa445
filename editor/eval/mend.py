"""MEND baseline (Mitchell et al., ICLR 2022): a trained hypernetwork turns the edited layer's
gradient on the fact into a weight update.

For a linear layer y = W u, the gradient of the edit loss is a sum of rank-1 terms
dL/dW = sum_t delta_t u_t^T over the positions t that feed the loss (delta_t = dL/dy_t). MEND
standardises each (u_t, delta_t), passes their concatenation through a small residual MLP with
low-rank layers initialised to the identity, splits the result back into (u'_t, delta'_t) and
updates W <- W - edit_lr * sum_t delta'_t u'_t^T, with edit_lr learned too.

Training (on development edits built from the easy-VQA TRAIN split, never on the evaluation cases)
minimises cedit * L_edit + cloc * L_loc per edit: L_edit is the cross-entropy of the new answer on
the edit's own input, its rephrasings and other images in its scope under the updated weight;
L_loc is KL(unedited || updated) of the next-token distributions on out-of-scope inputs. The
backbone's weights stay frozen: during training the update is added to the layer's output by a
hook, so gradients reach the hypernetwork only. At `apply` the update is written into the weight
(sequential edits compose); `reset` restores the original weight.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from editor.adapter import layer_sizes
from editor.backbones import Backbone
from editor.eval.hparams import MendConfig
from editor.eval.methods import WeightMethod
from editor.eval.readout import Readout
from editor.fact import Fact, ImageInput

logger = logging.getLogger(__name__)

Example = tuple[ImageInput, str, str]  # (image, question, answer)


@dataclass(frozen=True)
class TrainingEdit:
    """One development edit: the fact, inputs that must take the new answer, inputs that must not change."""

    fact: Fact
    outer: tuple[Example, ...]  # (image, question, new answer): edit input, rephrasings, other images
    loc: tuple[tuple[ImageInput, str, str], ...]  # (image, question, an answer whose positions are compared)


class LowRankResidual(nn.Module):
    """x + act(B A x + b), with B = 0 at start (so the layer starts as the identity)."""

    def __init__(self, size: int, rank: int, activation: bool, generator: torch.Generator) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, size, generator=generator) * size**-0.5)  # (r, D)
        self.up = nn.Parameter(torch.zeros(size, rank))  # (D, r)
        self.bias = nn.Parameter(torch.zeros(size))  # (D,)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x @ self.down.T) @ self.up.T + self.bias  # (N, D)
        return x + (torch.relu(h) if self.activation else h)


class GradientTransform(nn.Module):
    """MEND's editor network for one layer: standardised (u, delta) -> (u', delta')."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, input_size: int, output_size: int, config: MendConfig) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(config.seed)
        size = input_size + output_size
        self.input_size, self.output_size = input_size, output_size
        self.register_buffer("mean", torch.zeros(size))  # (Din + Dout,)
        self.register_buffer("std", torch.ones(size))  # (Din + Dout,)
        self.layers = nn.ModuleList(
            LowRankResidual(size, config.rank, i < config.num_layers - 1, generator)
            for i in range(config.num_layers)
        )
        self.edit_lr = nn.Parameter(torch.tensor(float(config.edit_lr)))

    def set_statistics(self, inputs: torch.Tensor, deltas: torch.Tensor) -> None:
        z = torch.cat([inputs, deltas], dim=-1).float()  # (N, Din + Dout)
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0).clamp_min(1e-8) if z.shape[0] > 1 else torch.ones_like(self.std))

    def forward(self, inputs: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """inputs (N, Din), deltas (N, Dout) -> the weight update to subtract. -> (Dout, Din)"""
        z = (torch.cat([inputs, deltas], dim=-1).float() - self.mean) / self.std  # (N, D)
        for layer in self.layers:
            z = layer(z)
        u, d = z.split([self.input_size, self.output_size], dim=-1)  # (N, Din), (N, Dout)
        return self.edit_lr * (d.T @ u)  # (Dout, Din)


class Mend(WeightMethod):
    name = "mend"

    def __init__(
        self,
        backbone: Backbone,
        config: MendConfig,
        training_edits: Sequence[TrainingEdit],
        layer: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.backbone = backbone
        self.config = config
        self.layer_path = layer or backbone.default_layer
        self.layer = backbone.model.get_submodule(self.layer_path)
        self.input_size, self.output_size = layer_sizes(self.layer)
        weight = getattr(self.layer, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise TypeError(f"layer {self.layer_path!r} has no weight parameter")
        self.weight = weight
        # Conv1D (GPT-2) stores (in, out); the update is computed as (out, in).
        self.transposed = tuple(weight.shape) == (self.input_size, self.output_size) and not isinstance(
            self.layer, nn.Linear
        )
        self.original = weight.detach().clone()
        self.readout = Readout(backbone, config.max_new_tokens)
        self.network = GradientTransform(self.input_size, self.output_size, config)
        self.setup: dict[str, Any] = {"layer": self.layer_path}
        self.setup.update(self._train(list(training_edits), progress or (lambda _m: None)))

    # ----- gradients and updates --------------------------------------------------------------
    def _gradient_factors(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """(u_t, delta_t) at the answer positions of the loss on `examples`. -> (N, Din), (N, Dout)"""
        inputs, deltas = [], []
        for batch in self._batches(examples):
            u, delta, positions = self._layer_gradient(batch)
            if u.dim() == 2:  # OPT flattens (B, T, D) to (B*T, D)
                u = u.view(positions.shape[0], -1, u.shape[-1])
                delta = delta.view(positions.shape[0], -1, delta.shape[-1])
            rows = torch.arange(positions.shape[0]).unsqueeze(1).expand_as(positions)  # (B, L)
            inputs.append(u[rows, positions].reshape(-1, u.shape[-1]).float())  # (B*L, Din)
            deltas.append(delta[rows, positions].reshape(-1, delta.shape[-1]).float())  # (B*L, Dout)
        return torch.cat(inputs), torch.cat(deltas)

    def _layer_gradient(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's input u and dL/dy for its output y on one batch, and the answer positions."""
        captured: dict[str, torch.Tensor] = {}

        def hook(_m: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            captured["u"] = args[0].detach()
            captured["y"] = output.detach().requires_grad_(True)
            return captured["y"]

        handle = self.layer.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                loss, positions = self._loss(batch)
                (delta,) = torch.autograd.grad(loss, captured["y"])
        finally:
            handle.remove()
        return captured["u"], delta, positions

    def _batches(self, examples: Sequence[Example]) -> Iterator[Any]:
        """Teacher-forced batches of examples with equal answer length."""
        groups: dict[int, list[Example]] = {}
        for image, question, answer in examples:
            groups.setdefault(len(self.backbone.answer_ids(answer)), []).append((image, question, answer))
        for group in groups.values():
            yield self.backbone.encode(
                [self.backbone.query(i, q) for i, q, _ in group], [a for _, _, a in group]
            )

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        logits, positions = self._answer_logits(batch)
        targets = batch.targets.to(logits.device)  # (B, L)
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()), positions

    def _answer_logits(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        length = batch.targets.shape[1]
        positions = batch.key_positions.unsqueeze(1) + torch.arange(length).unsqueeze(0)  # (B, L)
        logits = self.backbone.model(**self.backbone.model_inputs(batch), use_cache=False).logits  # (B, T, V)
        index = positions.to(logits.device).unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # (B, L, V)
        return logits.gather(1, index).float(), positions

    @contextmanager
    def _with_update(self, update: torch.Tensor) -> Iterator[None]:
        """Run the layer as if its weight were W - update (update (Dout, Din)), differentiably."""

        def hook(_m: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            return output - nn.functional.linear(args[0].to(update.dtype), update).to(output.dtype)

        handle = self.layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    # ----- training ---------------------------------------------------------------------------
    def _train(self, edits: list[TrainingEdit], progress: Callable[[str], None]) -> dict[str, Any]:
        config = self.config
        if not edits:
            raise ValueError("MEND needs development edits to train on")
        started = time.perf_counter()
        rng = random.Random(config.seed)
        # Standardisation statistics from the gradients of a sample of edits.
        sample = edits[: min(len(edits), 30)]
        factors = [self._gradient_factors([(e.fact.image, e.fact.question, e.fact.answer)]) for e in sample]
        self.network.set_statistics(torch.cat([u for u, _ in factors]), torch.cat([d for _, d in factors]))
        # Unedited next-token distributions on the locality inputs, once per edit.
        base_loc: dict[int, list[tuple[Any, torch.Tensor]]] = {}
        optimiser = torch.optim.Adam(
            [
                {
                    "params": [p for n, p in self.network.named_parameters() if n != "edit_lr"],
                    "lr": config.meta_lr,
                },
                {"params": [self.network.edit_lr], "lr": config.edit_lr_lr},
            ]
        )
        history: list[tuple[float, float]] = []
        steps = 0
        order: list[int] = []
        for steps in range(1, config.train_steps + 1):
            if time.perf_counter() - started > config.max_train_seconds:
                logger.warning("MEND training stopped by max_train_seconds after %d steps", steps - 1)
                steps -= 1
                break
            if not order:
                order = list(range(len(edits)))
                rng.shuffle(order)
            index = order.pop()
            edit = edits[index]
            if index not in base_loc:
                with torch.no_grad():
                    base_loc[index] = [
                        (b, torch.log_softmax(self._answer_logits(b)[0], -1)) for b in self._batches(edit.loc)
                    ]
            u, d = self._gradient_factors([(edit.fact.image, edit.fact.question, edit.fact.answer)])
            with torch.enable_grad():
                update = self.network(u, d)  # (Dout, Din)
                with self._with_update(update):
                    edit_losses = [self._loss(b)[0] for b in self._batches(edit.outer)]
                    loc_losses = []
                    for batch, base in base_loc[index]:
                        edited = torch.log_softmax(self._answer_logits(batch)[0], -1)  # (B, L, V)
                        kl = (base.exp() * (base - edited)).sum(-1)  # (B, L)
                        loc_losses.append(kl.mean())
                edit_loss = torch.stack(edit_losses).mean()
                loc_loss = torch.stack(loc_losses).mean() if loc_losses else torch.zeros(())
                loss = config.cedit * edit_loss + config.cloc * loc_loss
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.network.parameters(), config.grad_clip)
                optimiser.step()
            history.append((edit_loss.item(), loc_loss.item()))
            if steps % 50 == 0:
                recent = history[-50:]
                edit_lr = self.network.edit_lr.item()
                message = (
                    f"MEND step {steps}/{config.train_steps}: edit loss "
                    f"{sum(h[0] for h in recent) / len(recent):.3f}, loc KL "
                    f"{sum(h[1] for h in recent) / len(recent):.4f}, edit_lr {edit_lr:.4g}"
                )
                logger.info(message)
                progress(message)
        tail = history[-50:] or [(float("nan"), float("nan"))]
        return {
            "training_seconds": time.perf_counter() - started,
            "training_steps": steps,
            "training_edits": len(edits),
            "final_edit_loss": sum(h[0] for h in tail) / len(tail),
            "final_loc_kl": sum(h[1] for h in tail) / len(tail),
            "edit_lr": self.network.edit_lr.item(),
        }

    # ----- the EditMethod interface -----------------------------------------------------------
    def apply(self, fact: Fact) -> dict[str, Any]:
        u, d = self._gradient_factors([(fact.image, fact.question, fact.answer)])
        with torch.no_grad():
            update = self.network(u, d).to(self.weight.dtype)  # (Dout, Din)
            self.weight.sub_(update.T if self.transposed else update)
        return {"update_norm": float(update.norm()), "positions": int(u.shape[0])}
