"""Generation under a codebook in which an input gets a fired entry's whole answer or none of it.

An entry's values are trained on the fact's own inputs; on another input inside its radius the
later layers can still let the base model win some answer steps and the entry others, which
splices the two answers ("re" + "ock" for a "block" fact asked about a rectangle). Generation
here rules that out by construction:

* The entry that fires at a row's key replaces the edited layer's output as usual, and the first
  answer token is whatever the model then predicts.
* When that token is the entry's first answer token, the entry has won: every later step is held
  to the entry's tokens (the rest of its answer, then the end of sequence).
* When it is not, the entry has lost: the row stops at once and is generated again with the
  codebook off, so it gets the unedited model's answer, and no fired entry is reported for it.

Entries whose tokens are unknown (stored before tokens were kept) are left to the values alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editor.adapter import CodebookAdapter, Mode
from editor.backbones import Backbone, Batch


@dataclass
class Generation:
    """Greedy tokens per row (end of sequence cut off) and, per row, the entry whose whole answer
    it holds (-1 when none) with its distance (inf when none)."""

    ids: list[list[int]]
    fired: torch.Tensor  # (B,) int64
    distance: torch.Tensor  # (B,) float


class HoldFiredAnswers:
    """Holds each row whose fired entry won its first token to that entry's tokens, and ends each
    row whose entry lost it (see the module docstring)."""

    def __init__(self, adapter: CodebookAdapter, fired: torch.Tensor, prompt_width: int,
                 eos_token_id: int) -> None:
        self._codebook = adapter.codebook
        self._fired = fired  # (B,) the scope's fired entries, filled in by the prompt's pass
        self._prompt_width = prompt_width
        self._eos = eos_token_id
        self._tokens: dict[int, list[int] | None] = {}
        self.lost: set[int] = set()

    def _tokens_of(self, row: int) -> list[int] | None:
        if row not in self._tokens:
            entry = int(self._fired[row])
            ids = self._codebook.answer_ids_of(entry) if entry >= 0 else None
            self._tokens[row] = None if ids is None else ids.tolist()
        return self._tokens[row]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Called by `generate` with the ids so far (B, T) and the next token's scores (B, V)."""
        step = input_ids.shape[1] - self._prompt_width  # answer tokens already chosen
        if step == 0:
            return scores
        for row in range(scores.shape[0]):
            tokens = self._tokens_of(row)
            if tokens is None:
                continue
            if row in self.lost or int(input_ids[row, self._prompt_width]) != tokens[0]:
                self.lost.add(row)
                hold = self._eos
            elif step < len(tokens):
                hold = tokens[step]
            else:
                continue  # the row has emitted its end of sequence; generate pads it
            scores[row] = float("-inf")
            scores[row, hold] = 0.0
        return scores


def generate(backbone: Backbone, adapter: CodebookAdapter, batch: Batch, max_new_tokens: int,
             mode: Mode = "lookup") -> Generation:
    """Greedy answers of `batch` through the adapter in `mode`; in "lookup" mode a row gets its
    fired entry's whole answer or the unedited answer (see the module docstring)."""
    with torch.no_grad(), adapter.scope(batch.key_positions, mode=mode) as state:
        hold = None
        if mode == "lookup":
            hold = HoldFiredAnswers(adapter, state.fired, int(batch.input_ids.shape[1]),
                                    backbone.eos_token_id)
        ids = backbone.generate_ids(batch, max_new_tokens, logits_processor=hold)
    fired, distance = state.fired.clone(), state.fired_distance.clone()
    lost = sorted(hold.lost) if hold is not None else []
    if lost:
        again = generate(backbone, adapter, rows_of(batch, lost), max_new_tokens, mode="off")
        for row, tokens in zip(lost, again.ids, strict=True):
            ids[row] = tokens
            fired[row], distance[row] = -1, float("inf")
    return Generation(ids, fired, distance)


def rows_of(batch: Batch, rows: list[int]) -> Batch:
    """The batch restricted to `rows` (in that order)."""
    index = torch.tensor(rows)

    def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[index]

    return Batch(batch.input_ids[index], batch.attention_mask[index], pick(batch.pixel_values),
                 batch.key_positions[index], pick(batch.targets))
