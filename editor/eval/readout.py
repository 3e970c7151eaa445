"""What the harness reads off a model: greedy answers and teacher-forced top-k tokens.

Every call runs inside a caller-given scope factory, so the same code reads the unedited model,
a model behind a codebook adapter (the scope turns lookup on), a fine-tuned model, or a prompt
with in-context demonstrations.

Rows are grouped so that a batch never needs padding (same prompt length, and for teacher forcing
the same answer length): a probe then gets bit-for-bit the logits it would get alone, and "the
edit did not fire" really means "same numbers as the unedited model".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from editor import commit
from editor.adapter import CodebookAdapter, Scope
from editor.backbones import Backbone, Batch, Query

ScopeFactory = Callable[[Batch], AbstractContextManager[Scope | None]]


def no_scope(_batch: Batch) -> AbstractContextManager[Scope | None]:
    return nullcontext(None)


@dataclass(frozen=True)
class Generated:
    text: str
    fired: bool | None  # whether a codebook entry fired; None for methods without a codebook
    entry_answer: str | None = None  # the fired entry's (normalised) answer


class Readout:
    """Greedy answers and top-k tokens of `backbone`, batched without padding."""

    def __init__(self, backbone: Backbone, max_new_tokens: int, batch_size: int = 32) -> None:
        self.backbone = backbone
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def _batches(
        self, queries: Sequence[Query], answers: Sequence[str] | None
    ) -> list[tuple[list[int], Batch]]:
        """Encode each row once, then stack rows of equal length: (row indices, batch) pairs."""
        groups: dict[tuple[int, int], list[tuple[int, Batch]]] = {}
        for row, query in enumerate(queries):
            single = self.backbone.encode([query], None if answers is None else [answers[row]])
            answer_length = 0 if single.targets is None else int(single.targets.shape[1])
            groups.setdefault((int(single.input_ids.shape[1]), answer_length), []).append((row, single))
        result = []
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                result.append(([row for row, _ in chunk], _stack([b for _, b in chunk])))
        return result

    def generate(self, queries: Sequence[Query], scope: ScopeFactory = no_scope,
                 adapter: CodebookAdapter | None = None) -> list[Generated]:
        """Greedy answers inside `scope`; with `adapter`, through its codebook as the editor
        answers (`editor.commit`: a fired entry's whole answer or the unedited one)."""
        results: list[Generated | None] = [None] * len(queries)
        for rows, batch in self._batches(queries, None):
            if adapter is not None:
                made = commit.generate(self.backbone, adapter, batch, self.max_new_tokens)
                ids, fired = made.ids, made.fired.tolist()
            else:
                with torch.no_grad(), scope(batch) as state:
                    ids = self.backbone.generate_ids(batch, self.max_new_tokens)
                fired = None if state is None else state.fired.tolist()
            for i, row in enumerate(rows):
                entry = None if fired is None else int(fired[i])
                results[row] = Generated(
                    self.backbone.decode(ids[i]), None if entry is None else entry >= 0,
                    adapter.codebook.entry_answer(entry) if adapter is not None and entry is not None
                    and entry >= 0 else None)
        return [r for r in results if r is not None]

    def ranked(
        self, queries: Sequence[Query], answers: Sequence[str], k: int, scope: ScopeFactory = no_scope
    ) -> list[torch.Tensor]:
        """Top-k token ids, in rank order, at each answer position (teacher forced). -> [(L, k)]"""
        results: list[torch.Tensor | None] = [None] * len(queries)
        for rows, batch in self._batches(queries, answers):
            assert batch.targets is not None
            length = batch.targets.shape[1]
            positions = batch.key_positions.unsqueeze(1) + torch.arange(length).unsqueeze(0)  # (B, L)
            with torch.no_grad(), scope(batch):
                logits = self.backbone.model(**self.backbone.model_inputs(batch), use_cache=False).logits
            index = positions.to(logits.device).unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # (B, L, V)
            at_answer = logits.gather(1, index).float()  # (B, L, V)
            top = at_answer.topk(min(k, at_answer.shape[-1]), dim=-1).indices.cpu()  # (B, L, k)
            for i, row in enumerate(rows):
                results[row] = top[i]
        return [r for r in results if r is not None]

    def target_ids(self, answer: str) -> torch.Tensor:
        """The answer's token ids followed by end-of-sequence. -> (L,)"""
        return torch.tensor(self.backbone.answer_ids(answer), dtype=torch.long)


def _stack(batches: Sequence[Batch]) -> Batch:
    """Rows of equal length (no padding needed) as one batch."""
    pixels = [b.pixel_values for b in batches if b.pixel_values is not None]
    targets = [b.targets for b in batches if b.targets is not None]
    return Batch(
        torch.cat([b.input_ids for b in batches]),  # (B, T)
        torch.cat([b.attention_mask for b in batches]),  # (B, T)
        torch.cat(pixels) if pixels else None,  # (B, C, H, W)
        torch.cat([b.key_positions for b in batches]),  # (B,)
        torch.cat(targets) if targets else None,  # (B, L)
    )
