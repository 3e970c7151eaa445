"""The interface every evaluated method implements, and BalancEdit / GRACE behind it.

An `EditMethod` is driven by the runner only through `apply`, `reset`, `generate`, `ranked` and
`close`; the runner never looks inside. `reset` returns the model to its unedited state (a fresh
codebook, the original weights, an empty context), which is what independent mode calls before
every case.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from editor.adapter import Scope
from editor.backbones import Backbone, Batch, Query
from editor.codebook import Codebook
from editor.editor import Editor
from editor.eval.hparams import MethodSettings
from editor.eval.readout import Generated, Readout, no_scope
from editor.fact import Fact, ImageInput
from editor.radius import pairwise_distances
from editor.samples import ReferenceItem

Input = tuple[ImageInput, str]


class EditMethod(Protocol):
    name: str
    setup: dict[str, Any]  # one-off costs and facts about the method (e.g. training time)

    def apply(self, fact: Fact) -> dict[str, Any]:
        """Edit the model with `fact`; return JSON-able details for the report."""
        ...

    def reset(self) -> None:
        """Back to the unedited model."""
        ...

    def generate(self, inputs: Sequence[Input]) -> list[Generated]:
        """Greedy answers of the edited model."""
        ...

    def ranked(self, inputs: Sequence[Input], answers: Sequence[str], k: int) -> list[torch.Tensor]:
        """Top-k token ids at each answer position, teacher forced on `answers`. -> [(L, k)]"""
        ...

    def close(self) -> None:
        """Leave the backbone as it was found."""
        ...


class ReadoutMethod:
    """What every method here shares: `generate` and `ranked` read the model through `readout`,
    on the queries `_queries` makes of the inputs, inside the scope `_scope` opens per batch (none
    by default); `close` resets. Subclasses set `backbone` and `readout` and define `apply` and
    `reset`."""

    backbone: Backbone
    readout: Readout

    def _queries(self, inputs: Sequence[Input]) -> list[Query]:
        return [self.backbone.query(image, question) for image, question in inputs]

    def _scope(self, batch: Batch) -> AbstractContextManager[Scope | None]:
        return no_scope(batch)

    def reset(self) -> None:
        raise NotImplementedError

    def generate(self, inputs: Sequence[Input]) -> list[Generated]:
        return self.readout.generate(self._queries(inputs), self._scope)

    def ranked(self, inputs: Sequence[Input], answers: Sequence[str], k: int) -> list[torch.Tensor]:
        return self.readout.ranked(self._queries(inputs), answers, k, self._scope)

    def close(self) -> None:
        self.reset()


class WeightMethod(ReadoutMethod):
    """A method that changes one layer's `weight` in place; `reset` copies `original` back."""

    weight: torch.Tensor
    original: torch.Tensor

    def reset(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)


class CodebookMethod(ReadoutMethod):
    """BalancEdit or GRACE: `editor.Editor` with a fresh codebook per `reset`."""

    def __init__(
        self, backbone: Backbone, settings: MethodSettings, reference_pool: Sequence[ReferenceItem] = ()
    ) -> None:
        assert settings.edit_config is not None and settings.codebook is not None
        self.name = settings.method
        hparams = settings.edit_config.to_dict()
        method = hparams.pop("method")
        pool = list(reference_pool)[: settings.codebook.pool_size]
        layer = settings.codebook.layer or None
        self.editor = Editor(backbone, method=method, layer=layer, reference_pool=pool, **hparams)
        self.backbone = backbone
        self.readout = Readout(backbone, settings.edit_config.max_new_tokens)
        started = time.perf_counter()
        # The editor indexes its reference pool (keys and unedited answers) on first use; do it
        # here so that the first edit's time is comparable to the others.
        index_pool = getattr(self.editor, "_pool_index", None)
        if (
            pool
            and method == "balancedit"
            and settings.edit_config.num_hard_negatives
            and callable(index_pool)
        ):
            index_pool()
        self.setup: dict[str, Any] = {
            "reference_pool_items": len(pool),
            "pool_index_seconds": time.perf_counter() - started,
            "layer": self.editor.layer,
        }

    def _scope(self, batch: Batch) -> AbstractContextManager[Scope | None]:
        return self.editor.adapter.scope(batch.key_positions, mode="lookup")

    def generate(self, inputs: Sequence[Input]) -> list[Generated]:
        return self.readout.generate(self._queries(inputs), adapter=self.editor.adapter)

    def apply(self, fact: Fact) -> dict[str, Any]:
        report = self.editor.apply(fact)
        details = report.to_dict()
        details.pop("answer", None)
        return details

    def reset(self) -> None:
        self.editor.load_codebook(Codebook(self.editor.spec, self.editor.config.to_dict()))

    def nearest(self, inputs: Sequence[Input]) -> list[dict[str, Any]]:
        """For diagnosis: distance of each input's key to the nearest entry, and that entry's radius."""
        codebook = self.editor.codebook
        if not len(codebook) or not inputs:
            return [{} for _ in inputs]
        keys = self.editor.keys(self._queries(inputs))  # (B, Din)
        distance = pairwise_distances(keys, codebook.keys, codebook.spec.distance)  # (B, N)
        best_distance, best = distance.min(dim=1)  # (B,), (B,)
        return [
            {
                "nearest": codebook.fact_id(int(j)),
                "distance": float(d),
                "radius": float(codebook.radii[int(j)]),
            }
            for d, j in zip(best_distance, best, strict=True)
        ]

    def close(self) -> None:
        self.editor.close()
