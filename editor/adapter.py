"""A codebook adapter that wraps one linear layer of the text decoder.

How an edit acts on a sequence (the multi-token mechanism):
  * The key of a sequence is the wrapped layer's input at that sequence's own last prompt token
    (with `attach_image_features`, followed by the mean of the image's features; see there).
  * At that position the codebook is searched once; the entry that fires (nearest key whose ball
    contains the query) stays attached to the sequence for the rest of the call.
  * The entry's values are a short sequence: value[0] replaces the layer's output at the last
    prompt token (it predicts the first answer token), value[j] replaces the output at answer
    position j (it predicts token j+1), and the last value leads to the end-of-sequence token.
    Beyond the answer the layer runs unchanged.
This works for teacher-forced passes (all positions in one call) and for cached greedy
generation (the prompt in the first call, then one token per call), because the adapter tracks
positions within a `scope`, opened by the caller around one batch of sequences.

The base layer is never modified: uninstalling puts the same module object back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from editor.codebook import Codebook
from editor.errors import EditorError, UnsupportedBackboneError

Mode = Literal["lookup", "off", "forced"]


def layer_sizes(layer: nn.Module) -> tuple[int, int]:
    """(input size, output size) of an nn.Linear or a GPT-2 style Conv1D (weight stored (in, out))."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        weight = layer.weight
        return int(weight.shape[0]), int(weight.shape[1])
    raise UnsupportedBackboneError(
        f"the edited layer must be nn.Linear or Conv1D, got {type(layer).__name__}; "
        "choose an MLP output projection of the text decoder"
    )


@dataclass
class Scope:
    """Per-call state of one batch of sequences; lives only inside `CodebookAdapter.scope`."""

    key_positions: torch.Tensor  # (B,) index of each row's last prompt token
    mode: Mode
    forced_values: torch.Tensor | None = None  # (L, Dout) used for every row in "forced" mode
    record_steps: int = 0  # in "off" mode, record the base output at this many steps from the key
    offset: int = 0  # positions already seen (cached generation)
    fired: torch.Tensor = field(init=False)  # (B,) entry index per row, -1 when none
    fired_distance: torch.Tensor = field(init=False)  # (B,)
    stop_after_keys: bool = False  # raise KeysCaptured once every row's key is recorded
    keys: torch.Tensor | None = None  # (B, key size) recorded at the key positions
    recorded_outputs: torch.Tensor | None = None  # (B, record_steps, Dout)
    image_features: torch.Tensor | None = None  # (B, Dimg) the mean image features, when attached

    def __post_init__(self) -> None:
        b = self.key_positions.shape[0]
        self.fired = torch.full((b,), -1, dtype=torch.long)
        self.fired_distance = torch.full((b,), float("inf"))


class KeysCaptured(Exception):
    """Raised inside the forward pass of a `stop_after_keys` scope: the rest of the model is skipped."""


class CodebookAdapter(nn.Module):
    def __init__(self, base_layer: nn.Module, codebook: Codebook) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.codebook = codebook
        self.input_size, self.output_size = layer_sizes(base_layer)
        self.key_size = self.input_size
        self.image_weight = 0.0
        self._image_hook: Any = None
        self._scope: Scope | None = None

    def attach_image_features(self, module: nn.Module, size: int, weight: float) -> None:
        """Make keys image-aware: each key becomes the layer's input at the prompt's last token,
        L2-normalised, followed by `weight` times the L2-normalised mean over tokens of what
        `module` (the projector that hands the image to the text decoder, output (B, tokens,
        `size`)) produced for that row in the same pass. A row without an image gets zeros there."""
        if self._image_hook is not None:
            raise EditorError("image features are already attached to this adapter")

        def record(_module: nn.Module, _args: Any, output: Any) -> None:
            state = self._scope
            features = output[0] if isinstance(output, tuple) else output
            if state is not None and isinstance(features, torch.Tensor) and features.dim() == 3:
                state.image_features = features.detach().float().mean(dim=1).cpu()  # (B, Dimg)

        self._image_hook = module.register_forward_hook(record)
        self.key_size, self.image_weight = self.input_size + size, float(weight)

    def detach_image_features(self) -> None:
        if self._image_hook is not None:
            self._image_hook.remove()
        self._image_hook = None
        self.key_size, self.image_weight = self.input_size, 0.0

    def _keys_of(self, state: Scope, rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """The keys of `rows` from the layer's inputs at their key positions (R, Din)."""
        if not self.image_weight:
            return queries
        image = torch.zeros(rows.shape[0], self.key_size - self.input_size)
        features = state.image_features
        if features is not None and features.shape[0] == state.key_positions.shape[0]:
            image = features[rows]
        return torch.cat([torch.nn.functional.normalize(queries, dim=-1),
                          self.image_weight * torch.nn.functional.normalize(image.to(queries.device), dim=-1)],
                         dim=-1)  # (R, key size)

    @contextmanager
    def scope(
        self,
        key_positions: torch.Tensor,
        mode: Mode = "lookup",
        forced_values: torch.Tensor | None = None,
        record_steps: int = 0,
        stop_after_keys: bool = False,
    ) -> Iterator[Scope]:
        if self._scope is not None:
            raise EditorError("codebook adapter scopes cannot be nested")
        if mode == "forced" and forced_values is None:
            raise EditorError("forced mode needs forced_values")
        state = Scope(key_positions.detach().cpu().long(), mode, forced_values, record_steps,
                      stop_after_keys=stop_after_keys)
        self._scope = state
        try:
            yield state
        finally:
            self._scope = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        state = self._scope
        if state is None:
            raise EditorError(
                "the edited model was called outside an editor scope; use Editor.answer / "
                "Editor.generate (or Backbone helpers) so each sequence's prompt end is known"
            )
        batch = state.key_positions.shape[0]
        flat = x.dim() == 2  # OPT flattens (B, T, D) to (B*T, D) inside its MLP
        if flat:
            if x.shape[0] % batch:
                raise EditorError(f"cannot split {x.shape[0]} flattened rows into batch {batch}")
            x3 = x.view(batch, -1, x.shape[-1])  # (B, T, Din)
            y3 = y.view(batch, -1, y.shape[-1])  # (B, T, Dout)
        else:
            x3, y3 = x, y
        length = x3.shape[1]
        start = state.offset if (length == 1 and state.offset > 0) else 0
        state.offset = start + length

        rows_with_key = [
            b for b in range(batch) if start <= int(state.key_positions[b]) < start + length
        ]
        if rows_with_key:
            self._visit_keys(state, x3, y3, rows_with_key, start)
            if state.stop_after_keys and len(rows_with_key) == batch:
                raise KeysCaptured
        if state.mode == "off":
            return y
        out = self._replace(state, y3, start)
        return out.reshape(y.shape) if flat else out

    def _visit_keys(
        self, state: Scope, x3: torch.Tensor, y3: torch.Tensor, rows: list[int], start: int
    ) -> None:
        index = torch.tensor(rows)
        local = state.key_positions[index] - start  # (R,)
        inputs = x3[index.to(x3.device), local.to(x3.device)].detach().float()  # (R, Din)
        queries = self._keys_of(state, index, inputs)  # (R, key size)
        if state.keys is None:
            state.keys = torch.zeros(state.key_positions.shape[0], self.key_size)
        state.keys[index] = queries.cpu()
        if state.mode == "lookup":
            fired, distance = self.codebook.lookup(queries)
            state.fired[index] = fired
            state.fired_distance[index] = distance
        elif state.mode == "forced":
            state.fired[index] = 0
        if state.record_steps:
            if state.recorded_outputs is None:
                state.recorded_outputs = torch.zeros(
                    state.key_positions.shape[0], state.record_steps, self.output_size
                )
            for row, pos in zip(rows, local.tolist(), strict=True):
                steps = y3[row, pos : pos + state.record_steps].detach().float().cpu()
                state.recorded_outputs[row, : steps.shape[0]] = steps

    def _replace(self, state: Scope, y3: torch.Tensor, start: int) -> torch.Tensor:
        active = (state.fired >= 0).nonzero().flatten().tolist()
        if not active:
            return y3
        out = y3.clone()
        length = y3.shape[1]
        for row in active:
            if state.mode == "forced":
                assert state.forced_values is not None
                values = state.forced_values
            else:
                values = self.codebook.values_of(int(state.fired[row]))
            first_step = start - int(state.key_positions[row])  # answer step of position `start`
            lo = max(0, -first_step)  # first local position at or after the key
            hi = min(length, values.shape[0] - first_step)  # past the last step with a value
            if lo >= hi:
                continue
            steps = values[first_step + lo : first_step + hi]  # (hi - lo, Dout)
            out[row, lo:hi] = steps.to(device=out.device, dtype=out.dtype)
        return out


def install(model: nn.Module, layer_path: str, codebook: Codebook) -> CodebookAdapter:
    """Swap the layer at `layer_path` for a `CodebookAdapter` wrapping it."""
    try:
        layer = model.get_submodule(layer_path)
    except AttributeError as exc:
        raise UnsupportedBackboneError(f"model has no layer {layer_path!r}") from exc
    if isinstance(layer, CodebookAdapter):
        raise EditorError(f"layer {layer_path!r} already carries a codebook adapter")
    adapter = CodebookAdapter(layer, codebook)
    parent_path, _, name = layer_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, adapter)
    return adapter


def uninstall(model: nn.Module, layer_path: str) -> nn.Module:
    """Put the original layer back and return it (bit-identical: it was never touched)."""
    adapter = model.get_submodule(layer_path)
    if not isinstance(adapter, CodebookAdapter):
        raise EditorError(f"layer {layer_path!r} carries no codebook adapter")
    parent_path, _, name = layer_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, adapter.base_layer)
    return adapter.base_layer
