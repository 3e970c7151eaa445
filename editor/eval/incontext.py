"""IKE baseline: in-context knowledge editing (Zheng et al. 2023), no weight change.

The question the model sees becomes, in the reference harness's text format::

    New Fact: <demo question> <demo new answer>
    Prompt: <demo prompt> <demo prompt's answer>

    ... (num_demos demonstrations) ...
    New Fact: <fact question> <fact answer>
    Prompt: <the question asked>

and the backbone's own template wraps it (image tokens first). Demonstrations come from a
development set of edits and are of IKE's three kinds in turn: copy (the fact's own question),
update (a rephrasing: the new answer), retain (an unrelated question: its usual answer); the most
similar development edits (word overlap with the fact's question) are used first. Demonstrations
are text only: the single-image models here cannot show a demonstration's image.

Sequential mode keeps every applied fact and puts up to `max_facts` of them in the context, the
most similar to the question first (then the most recent). Whatever does not fit the prompt budget
(the model's position limit minus room for the answer) is dropped, demonstrations first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from editor.backbones import Backbone, Query
from editor.eval.hparams import InContextConfig
from editor.eval.methods import Input, ReadoutMethod
from editor.eval.readout import Readout
from editor.fact import Fact

ANSWER_ROOM = 16  # tokens kept free for the answer when the budget is taken from the model
DEMO_KINDS = ("copy", "update", "retain")


@dataclass(frozen=True)
class DemoSource:
    """One development edit, enough to write IKE's three kinds of demonstration."""

    question: str
    answer: str  # the new answer
    rephrase: str  # another phrasing of `question`
    other_question: str  # a question the edit must not change ...
    other_answer: str  # ... and its usual answer


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.casefold()))


def similarity(a: str, b: str) -> float:
    """Jaccard overlap of the word sets."""
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / len(wa | wb) if wa | wb else 0.0


def demonstration(source: DemoSource, kind: str) -> str:
    prompt, answer = {
        "copy": (source.question, source.answer),
        "update": (source.rephrase, source.answer),
        "retain": (source.other_question, source.other_answer),
    }[kind]
    return f"New Fact: {source.question} {source.answer}\nPrompt: {prompt} {answer}\n\n"


class InContext(ReadoutMethod):
    name = "ike"

    def __init__(
        self, backbone: Backbone, config: InContextConfig, demo_sources: Sequence[DemoSource]
    ) -> None:
        self.backbone = backbone
        self.config = config
        self.sources = list(demo_sources)
        self.facts: list[Fact] = []
        self.readout = Readout(backbone, config.max_new_tokens)
        self.budget = config.max_prompt_tokens or max(_position_limit(backbone) - ANSWER_ROOM, 1)
        self._overhead: dict[tuple[int, int], int] = {}
        self.setup: dict[str, Any] = {"prompt_budget_tokens": self.budget, "demo_sources": len(self.sources)}

    def apply(self, fact: Fact) -> dict[str, Any]:
        self.facts.append(fact)
        return {"facts_in_memory": len(self.facts), "demos": len(self._demos(fact))}

    def reset(self) -> None:
        self.facts = []

    def _demos(self, fact: Fact) -> list[str]:
        ranked = sorted(
            range(len(self.sources)), key=lambda i: (-similarity(self.sources[i].question, fact.question), i)
        )
        return [
            demonstration(self.sources[i], DEMO_KINDS[n % 3])
            for n, i in enumerate(ranked[: self.config.num_demos])
        ]

    def context(self, query: Query) -> str:
        """The question text the model is given for `query` (demonstrations, facts, prompt)."""
        if not self.facts:
            return query.question
        order = sorted(
            range(len(self.facts)), key=lambda i: (-similarity(self.facts[i].question, query.question), -i)
        )
        facts = [self.facts[i] for i in order[: self.config.max_facts]]
        demos = self._demos(facts[0])
        overhead = self._prompt_overhead(query)
        while True:
            fact_lines = "".join(f"New Fact: {f.question} {f.answer}\n" for f in reversed(facts))
            text = "".join(demos) + fact_lines + f"Prompt: {query.question}"
            if overhead + self._length(text) <= self.budget or (not demos and len(facts) == 1):
                return text
            if demos:
                demos.pop()
            else:
                facts.pop()

    def _length(self, text: str) -> int:
        return len(self.backbone.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt_overhead(self, query: Query) -> int:
        """Tokens of the prompt besides the question text (image tokens, template, specials)."""
        size = (0, 0) if query.image is None else query.image.size
        if size not in self._overhead:
            full = len(self.backbone.encode([Query(query.image, "x")]).input_ids[0])
            self._overhead[size] = full - self._length("x")
        return self._overhead[size]

    def _queries(self, inputs: Sequence[Input]) -> list[Query]:
        """The inputs with their questions wrapped in the in-context prompt."""
        return [Query(q.image, self.context(q)) for q in super()._queries(inputs)]


def _position_limit(backbone: Backbone) -> int:
    config = backbone.model.config
    text = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
