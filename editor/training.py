"""Value optimisation over cached activations.

One capture pass runs the whole model on the training sequences with the codebook off, and
records what enters each decoder layer from the edited one on. The optimisation loop then reruns
only those layers (the edited decoder layer, the layers after it and the output head) with the
trainable value forced in at the answer positions: the vision tower, the projector and the
earlier decoder layers run once per edit, not once per step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from editor.adapter import CodebookAdapter, Scope
from editor.backbones import Backbone, Batch

logger = logging.getLogger(__name__)

# `train_value` reports progress every this many steps: often enough for a progress bar, rarely
# enough that a callback writing to a database costs nothing next to the steps.
PROGRESS_EVERY_STEPS = 10
# progress(done, total): optimisation steps done out of the most it may take.
Progress = Callable[[int, int], None]


@dataclass
class CapturedSuffix:
    """Inputs of decoder layers first..last as they were called in the capture pass."""

    first: int
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]


@dataclass(frozen=True)
class TrainResult:
    values: torch.Tensor  # (L, Dout)
    steps: int
    converged: bool
    seconds: float


def capture(
    backbone: Backbone, adapter: CodebookAdapter, batch: Batch, first_layer: int, record_steps: int
) -> tuple[CapturedSuffix, Scope]:
    """Run the unedited model once; record decoder-layer inputs from `first_layer` on and the keys."""
    layers = backbone.decoder_layers
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    hooks = []

    def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((_detach(args), _detach(kwargs)))

    for index in range(first_layer, len(layers)):
        hooks.append(layers[index].register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad(), adapter.scope(batch.key_positions, mode="off", record_steps=record_steps) as state:
            backbone.model(**backbone.model_inputs(batch), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    if len(calls) != len(layers) - first_layer:
        raise RuntimeError(f"captured {len(calls)} decoder calls, expected {len(layers) - first_layer}")
    return CapturedSuffix(first_layer, calls), state


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def run_suffix(backbone: Backbone, suffix: CapturedSuffix, positions: torch.Tensor) -> torch.Tensor:
    """Logits at `positions` (B, L) from rerunning the captured decoder layers and the head."""
    layers = backbone.decoder_layers
    hidden: torch.Tensor | None = None
    for offset, (args, kwargs) in enumerate(suffix.calls):
        layer = layers[suffix.first + offset]
        if hidden is not None:
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden}
        out = layer(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    assert hidden is not None
    index = positions.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (B, L, D)
    hidden = hidden.gather(1, index)  # (B, L, D)
    for module in backbone.head_modules():
        hidden = module(hidden)
    return hidden.float()  # (B, L, V)


def target_margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How far each target's logit leads the best other token. logits (B, L, V), targets (B, L)
    -> (B, L); positive exactly where the target is the argmax."""
    target = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, L)
    others = logits.scatter(-1, targets.unsqueeze(-1), float("-inf")).amax(-1)  # (B, L)
    return target - others


def train_value(
    backbone: Backbone,
    adapter: CodebookAdapter,
    batch: Batch,
    suffix: CapturedSuffix,
    init_values: torch.Tensor,
    lr: float,
    max_steps: int,
    early_stop: bool,
    stop_margin: float = 0.0,
    progress: Progress | None = None,
) -> TrainResult:
    """Adam on the entry's values so every row of `batch` produces its whole answer.

    batch.targets (B, L); init_values (L, Dout). Stops once the argmax at every answer position of
    every row equals the target (then greedy generation yields exactly the answer) with a logit
    lead of more than `stop_margin` over the runner-up, if `early_stop`.

    `progress`, when given, is called with (0, max_steps) first, (step, max_steps) after every
    `PROGRESS_EVERY_STEPS`-th step and (max_steps, max_steps) when the optimisation ends, early or
    not; it sees counts only, so the values are the same with or without it.
    """
    assert batch.targets is not None
    started = time.perf_counter()
    targets = batch.targets.to(backbone.device)  # (B, L)
    steps_ahead = torch.arange(targets.shape[1])  # (L,)
    positions = batch.key_positions.unsqueeze(1) + steps_ahead.unsqueeze(0)  # (B, L)
    values = nn.Parameter(init_values.detach().clone().float().to(backbone.device))
    optimiser = torch.optim.Adam([values], lr=lr)
    converged = False
    steps = 0
    if progress is not None:
        progress(0, max_steps)
    with torch.enable_grad():
        for steps in range(1, max_steps + 1):
            with adapter.scope(batch.key_positions, mode="forced", forced_values=values):
                logits = run_suffix(backbone, suffix, positions)  # (B, L, V)
            if early_stop and bool((target_margins(logits.detach(), targets) > stop_margin).all()):
                converged = True
                steps -= 1
                break
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if progress is not None and steps % PROGRESS_EVERY_STEPS == 0 and steps < max_steps:
                progress(steps, max_steps)
    if not converged:
        with torch.no_grad(), adapter.scope(batch.key_positions, mode="forced", forced_values=values):
            logits = run_suffix(backbone, suffix, positions)
        converged = bool((logits.argmax(-1) == targets).all())
    if progress is not None:
        progress(max_steps, max_steps)
    seconds = time.perf_counter() - started
    logger.debug("value optimisation: %d steps, converged=%s, %.3fs", steps, converged, seconds)
    return TrainResult(values.detach().cpu(), steps, converged, seconds)
