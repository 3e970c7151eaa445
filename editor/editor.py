"""`Editor`: apply, retract and query facts on one backbone through a codebook adapter."""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from editor import commit
from editor.adapter import CodebookAdapter, KeysCaptured, Mode, install, layer_sizes, uninstall
from editor.ann import IndexSettings
from editor.backbones import Backbone, Batch, Query, image_bytes
from editor.codebook import Codebook, CodebookSpec, Entry
from editor.config import EditConfig
from editor.errors import EditorError, IncompatibleCodebookError, InvalidFactError
from editor.fact import Conflict, EditReport, Fact, ImageInput, input_fingerprint, normalise_answer
from editor.radius import choose_radius, pairwise_distances
from editor.samples import Paraphraser, ReferenceItem, TemplateParaphraser, black_image, distinct_questions
from editor.training import CapturedSuffix, Progress, TrainResult, capture, train_value

logger = logging.getLogger(__name__)

INFERENCE_BATCH = 32
# The pool's most frequent questions asked about the fact's image, as hard-negative candidates.
MAX_SAME_IMAGE_QUESTIONS = 16
# Answer tokens teacher-forced in the first chunk after a candidate's cached prompt, doubled in each
# chunk after: short answers take one or two calls, long ones stop soon after the rows diverge.
FIRST_CHUNK_TOKENS = 4


@dataclass(frozen=True)
class Answer:
    """A generated answer and the fact whose entry fired for it (None when none did)."""

    text: str
    fact_id: str | None
    distance: float | None


@dataclass(frozen=True)
class _TrainingSample:
    """What the capture pass over a fact's training rows gives the later phases of `apply`."""

    batch: Batch  # the fact's input, then its positives when train_on_rephrases
    suffix: CapturedSuffix  # inputs of the edited decoder layer onwards, for the optimisation
    key: torch.Tensor  # (Din,) the fact's key
    positive_keys: torch.Tensor  # (P, Din)
    warm_values: torch.Tensor  # (L, Dout) the layer's own outputs at the answer steps


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Record the seconds the block takes under `timings[phase]` (when it completes)."""
    tick = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - tick


@dataclass
class _PromptPass:
    """One batch of prompts run through the unedited model, to teacher-force answers after."""

    start: int  # index of the batch's first row in the caller's list of queries
    batch: Batch
    cache: Any  # the model's key/value cache after the prompts; None when the model takes none


@dataclass
class _PoolIndex:
    keys: torch.Tensor  # (P, Din)
    answers: list[str]  # unedited model's normalised answers


class Editor:
    """Applies facts to a frozen backbone as codebook entries on one linear layer.

    The adapter is installed on construction and removed by `close()` (or leaving a `with`
    block); the base weights are never modified.
    """

    def __init__(
        self,
        backbone: Backbone,
        method: str = "balancedit",
        *,
        layer: str | None = None,
        paraphraser: Paraphraser | None = None,
        reference_pool: Iterable[ReferenceItem] | None = None,
        codebook: Codebook | None = None,
        **hparams: Any,
    ) -> None:
        self.backbone = backbone
        self.config = EditConfig.from_dict({"method": method, **hparams})
        self.layer = layer or backbone.default_layer
        self._first_decoder = backbone.decoder_index(self.layer)
        try:
            base = backbone.model.get_submodule(self.layer)
        except AttributeError as exc:
            raise EditorError(f"model has no layer {self.layer!r}") from exc
        if isinstance(base, CodebookAdapter):
            raise EditorError(
                f"layer {self.layer!r} already carries a codebook adapter; close() the other Editor first"
            )
        input_size, output_size = layer_sizes(base)
        weight = self._image_key_weight(self.config)
        image = self._image_features() if weight > 0 else None
        key_size = input_size + (image[1] if image is not None else 0)
        key = f"layer+image*{weight:g}" if image is not None else "layer"
        self.spec = CodebookSpec(backbone.model_id, self.layer, key_size, output_size,
                                 self.config.distance, key)
        if codebook is None:
            codebook = Codebook(self.spec, self.config.to_dict())
        self.spec.check_compatible(codebook.spec)
        self.paraphraser = paraphraser or TemplateParaphraser()
        self._index_settings: IndexSettings | None = None
        self.reference_pool = list(reference_pool or [])
        self._pool: _PoolIndex | None = None
        self.adapter: CodebookAdapter = install(backbone.model, self.layer, codebook)
        if image is not None:
            self.adapter.attach_image_features(image[0], image[1], weight)

    def _image_key_weight(self, config: EditConfig) -> float:
        return config.image_key_weight_for(bool(self.backbone.family.image_features))

    def _image_features(self) -> tuple[torch.nn.Module, int]:
        """The module whose output is the image as the text decoder receives it, and its width."""
        family = self.backbone.family
        if not family.image_features:
            raise EditorError(f"image_key_weight needs a vision-language model; a {family.name} model has no image")
        module = self.backbone.model.get_submodule(family.image_features)
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise EditorError(f"{family.image_features} holds no linear layer to read the image width from")
        return module, int(linears[-1].out_features)

    # ----- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the adapter; the model is the base model again."""
        if self.adapter is not None:
            self.adapter.detach_image_features()
            uninstall(self.backbone.model, self.layer)
            self.adapter = None  # type: ignore[assignment]

    def __enter__(self) -> Editor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def codebook(self) -> Codebook:
        return self.adapter.codebook

    def reconfigure(self, hparams: dict[str, Any], reference_pool: Iterable[ReferenceItem] | None = None) -> None:
        """Use other editing hyperparameters (and hard-negative pool) for the edits from now on.

        The method and the distance stay: the codebook's keys and radii were made under them."""
        config = EditConfig.from_dict({"method": self.config.method, **hparams})
        for name in ("method", "distance"):
            if getattr(config, name) != getattr(self.config, name):
                raise IncompatibleCodebookError(
                    f"{name} cannot change from {getattr(self.config, name)!r} to {getattr(config, name)!r}: "
                    "the codebook was built under it"
                )
        if self._image_key_weight(config) != self._image_key_weight(self.config):
            raise IncompatibleCodebookError(
                f"image_key_weight cannot change from {self._image_key_weight(self.config):g} to "
                f"{self._image_key_weight(config):g}: the codebook's keys were made under it")
        self.config = config
        if reference_pool is not None:
            self.reference_pool = list(reference_pool)
            self._pool = None

    @property
    def index_settings(self) -> IndexSettings | None:
        """Lookup index settings applied to the codebook now and to every codebook
        `load_codebook` installs (None: each codebook keeps its own; see `Codebook.configure_index`)."""
        return self._index_settings

    @index_settings.setter
    def index_settings(self, settings: IndexSettings | None) -> None:
        self._index_settings = settings
        if settings is not None:
            self.codebook.configure_index(settings)

    def load_codebook(self, codebook: Codebook) -> None:
        """Replace the codebook (e.g. with a stored version); refuses a foreign one. With
        `index_settings` set, the codebook looks up under them (`Codebook.configure_index`)."""
        self.spec.check_compatible(codebook.spec)
        if self._index_settings is not None:
            codebook.configure_index(self._index_settings)
        self.adapter.codebook = codebook

    # ----- queries --------------------------------------------------------------------------
    def answer(self, image: ImageInput, question: str) -> str:
        return self.answers([(image, question)])[0].text

    def answers(
        self, inputs: Sequence[tuple[ImageInput, str]], *, edited: bool = True
    ) -> list[Answer]:
        """Greedy answers for (image, question) pairs, in batches; `edited=False` bypasses edits."""
        queries = [self.backbone.query(image, question) for image, question in inputs]
        return self._generate(queries, "lookup" if edited else "off")

    def _generate(self, queries: Sequence[Query], mode: Mode) -> list[Answer]:
        """Greedy answers; edited, each is a fired entry's whole answer or the unedited one
        (`editor.commit`)."""
        result: list[Answer] = []
        for start in range(0, len(queries), INFERENCE_BATCH):
            batch = self.backbone.encode(queries[start : start + INFERENCE_BATCH])
            made = commit.generate(self.backbone, self.adapter, batch, self.config.max_new_tokens, mode)
            for row, tokens in enumerate(made.ids):
                fired = int(made.fired[row])
                result.append(Answer(
                    self.backbone.decode(tokens),
                    self.codebook.fact_id(fired) if fired >= 0 else None,
                    float(made.distance[row]) if fired >= 0 else None,
                ))
        return result

    def keys(self, queries: Sequence[Query]) -> torch.Tensor:
        """The edited layer's input at each query's last prompt token. -> (B, Din)"""
        chunks = []
        for start in range(0, len(queries), INFERENCE_BATCH):
            batch = self.backbone.encode(queries[start : start + INFERENCE_BATCH])
            # The layers after the edited one cannot change the keys: the pass stops there.
            with torch.no_grad(), self.adapter.scope(batch.key_positions, mode="off",
                                                     stop_after_keys=True) as state:
                try:
                    self.backbone.model(**self.backbone.model_inputs(batch), use_cache=False)
                except KeysCaptured:
                    pass
            assert state.keys is not None
            chunks.append(state.keys)
        if not chunks:
            return torch.zeros(0, self.spec.input_size)
        return torch.cat(chunks)

    # ----- edits ----------------------------------------------------------------------------
    def apply(self, fact: Fact, progress: Progress | None = None, *,
              supersedes: Sequence[str] = ()) -> EditReport:
        """Add `fact` as a codebook entry: keys, radius, value, overlap rules. See the README.

        `supersedes` names facts in the codebook that the new fact replaces: their entries are
        removed when the new one is added, and the report lists them under `superseded` (with
        any older entry for the same input). The report's `conflicts` name the remaining facts
        the new entry collides with (`editor.fact.Conflict`).

        The phases, each timed in `EditReport.timings`: the training rows' capture pass (the
        fact's key, its positives' keys), the unedited answer, the negatives' keys (given and
        hard), the radius, the value optimisation, and the codebook's overlap rules.

        `progress(done, total)`, when given, follows the value optimisation, the phase whose
        length grows with the fact's rephrasings and `max_steps`: (0, max_steps) when it starts,
        every few steps after, and (max_steps, max_steps) when it ends (early or not). The
        result is the same with or without it.
        """
        started = time.perf_counter()
        timings: dict[str, float] = {}
        missing = sorted(f for f in set(supersedes) if not self.codebook.has_fact(f))
        if missing:
            raise EditorError(f"cannot supersede {', '.join(missing)}: not in the codebook")
        query, input_id, fact_id, target_length = self._identify(fact)
        with _timed(timings, "prefix_forward"):
            sample = self._training_sample(fact, query, target_length)
        with _timed(timings, "original_answer"):
            original, original_tokens = self._unedited_answer(query)
        negative_keys, hard_count = self._negative_keys(fact, query, sample.key, original,
                                                        original_tokens, timings)
        positive_distances = self._distances_to(sample.key, sample.positive_keys)
        negative_distances = self._distances_to(sample.key, negative_keys)
        radius, fallback = self._radius(positive_distances, negative_distances)
        if fallback:
            logger.warning("fact %s: %s", fact_id, fallback)
        with _timed(timings, "optimisation"):
            trained = self._train_values(sample, target_length, progress)
        with _timed(timings, "bookkeeping"):
            entry = Entry(fact_id, normalise_answer(fact.answer), input_id, sample.key, trained.values,
                          radius, torch.tensor(self.backbone.answer_ids(fact.answer)),
                          self._reach(positive_distances, radius))
            for old in supersedes:
                self.codebook.remove(old)
            prior, radii_before, ids_before = self._before_adding(entry)
            superseded, split = self.codebook.add(entry)
            conflicts = self._conflicts(entry, [*prior, *split], radii_before, ids_before, set(prior))
        return EditReport(
            fact_id=fact_id,
            answer=fact.answer,
            original_answer=original,
            radius=float(self.codebook.radii[self.codebook.index_of(fact_id)]),
            positive_distances=tuple(positive_distances.tolist()),
            negative_distances=tuple(negative_distances.tolist()),
            radius_fallback=fallback,
            steps=trained.steps,
            converged=trained.converged,
            seconds=time.perf_counter() - started,
            superseded=tuple(dict.fromkeys([*supersedes, *superseded])),
            split_with=tuple(split),
            conflicts=tuple(conflicts),
            num_hard_negatives=hard_count,
            timings=timings,
        )

    def _reach(self, positive_distances: torch.Tensor, radius: float) -> float:
        """How far the fact's own rephrasings reach inside its radius, which the overlap rule
        keeps under "keep_positives" (0 under "halve")."""
        if self.config.overlap_rule != "keep_positives":
            return 0.0
        inside = positive_distances[positive_distances <= radius]
        return float(inside.max()) if inside.numel() else 0.0

    def _before_adding(self, entry: Entry) -> tuple[list[str], torch.Tensor, list[str]]:
        """The fact whose entry fires at the new entry's key now, if it gives another answer (as a
        list of 0 or 1 fact ids), and the radii and fact ids before the new entry arrives."""
        fired, _ = self.codebook.lookup(entry.key[None])
        index = int(fired[0])
        prior = ([self.codebook.fact_id(index)]
                 if index >= 0 and self.codebook.entry_answer(index) != entry.answer else [])
        return prior, self.codebook.radii.clone(), self.codebook.fact_ids

    def _conflicts(self, entry: Entry, fact_ids: Sequence[str], radii_before: torch.Tensor,
                   ids_before: list[str], fired_before: set[str]) -> list[Conflict]:
        """Each fact among `fact_ids` still in the codebook whose answer differs from the new
        entry's, with its radius before and after and what its own input answers now."""
        book = self.codebook
        wanted = set(fact_ids)
        row_before = {fact_id: i for i, fact_id in enumerate(ids_before) if fact_id in wanted} if wanted else {}
        rows = [book.index_of(fact_id) for fact_id in dict.fromkeys(fact_ids)
                if fact_id in row_before and book.has_fact(fact_id)]  # the others were superseded by it
        rows = [row for row in rows if book.entry_answer(row) != entry.answer]
        if not rows:
            return []
        # What each one's own input answers now: one lookup for all of them (a batch of mutually
        # overlapping facts names dozens, and each lookup reads every key).
        now, _ = book.lookup(book.keys[rows])
        return [Conflict(
            book.fact_id(row), book.entry_answer(row),
            "fires_on_new_input" if book.fact_id(row) in fired_before else "overlaps",
            float(radii_before[row_before[book.fact_id(row)]]), float(book.radii[row]),
            book.entry_answer(int(fired)) if int(fired) >= 0 else None,
        ) for row, fired in zip(rows, now.tolist(), strict=True)]

    def _identify(self, fact: Fact) -> tuple[Query, str, str, int]:
        """The fact's query, input fingerprint, fact id and answer length in tokens (checked
        against `max_answer_tokens`)."""
        query = self.backbone.query(fact.image, fact.question)
        input_id = input_fingerprint(image_bytes(query.image), fact.question)
        fact_id = fact.fact_id or "f-" + hashlib.sha256(
            f"{input_id}\x00{normalise_answer(fact.answer)}".encode()).hexdigest()[:16]
        target_length = len(self.backbone.answer_ids(fact.answer))
        if target_length > self.config.max_answer_tokens:
            raise InvalidFactError(
                f"answer is {target_length} tokens long; the limit is {self.config.max_answer_tokens} "
                "(raise max_answer_tokens to allow longer answers)"
            )
        return query, input_id, fact_id, target_length

    def _training_sample(self, fact: Fact, query: Query, target_length: int) -> _TrainingSample:
        """Positives (given or paraphrased rephrasings, BalancEdit only), the training rows, and
        one capture pass over them that yields the keys and what the optimisation reruns."""
        config = self.config
        balanced = config.method == "balancedit"
        rephrases = list(fact.rephrases)
        if balanced and not rephrases and config.num_paraphrases:
            rephrases = self.paraphraser(fact.question, config.num_paraphrases)
        positives = [Query(query.image, q) for q in rephrases] if balanced else []
        train_rows = [query] + (positives if config.train_on_rephrases else [])
        train_batch = self.backbone.encode(train_rows, [fact.answer] * len(train_rows))
        suffix, state = capture(self.backbone, self.adapter, train_batch, self._first_decoder,
                                record_steps=target_length)
        assert state.keys is not None and state.recorded_outputs is not None
        positive_keys = state.keys[1:] if config.train_on_rephrases else self.keys(positives)
        return _TrainingSample(train_batch, suffix, state.keys[0], positive_keys,
                               state.recorded_outputs[0])

    def _negative_keys(self, fact: Fact, query: Query, key: torch.Tensor, original: str,
                       original_tokens: Sequence[int], timings: dict[str, float]) -> tuple[torch.Tensor, int]:
        """BalancEdit's negatives: the given ones and the black image, then the hard negatives.
        -> (keys (M, Din), how many of them are hard negatives). GRACE has none."""
        if self.config.method != "balancedit":
            return torch.zeros(0, self.spec.input_size), 0
        with _timed(timings, "negative_keys"):
            given = self.keys(self._negative_queries(fact, query))
        with _timed(timings, "hard_negatives"):
            hard = self._hard_negative_keys(key, query, original, original_tokens)
            keys = torch.cat([given, hard])
        return keys, hard.shape[0]

    def _distances_to(self, key: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Distance of each row of `keys` (M, Din) to `key` (Din,). -> (M,)"""
        if not len(keys):
            return torch.zeros(0)
        return pairwise_distances(key[None], keys, self.config.distance)[0]

    def _radius(self, positive_distances: torch.Tensor,
                negative_distances: torch.Tensor) -> tuple[float, str | None]:
        """BalancEdit's radius from the samples (and why it fell back, if it did); GRACE's fixed one."""
        config = self.config
        if config.method != "balancedit":
            return config.initial_radius, None
        choice = choose_radius(positive_distances, negative_distances, config.alpha, config.initial_radius)
        return choice.radius, choice.fallback

    def _train_values(self, sample: _TrainingSample, target_length: int,
                      progress: Progress | None = None) -> TrainResult:
        """The entry's values, started from the layer's own outputs (warm) or seeded noise (cold)."""
        config = self.config
        if config.value_init == "warm":
            init = sample.warm_values
        else:
            generator = torch.Generator().manual_seed(config.seed)
            init = torch.rand(target_length, self.spec.output_size, generator=generator)
        return train_value(self.backbone, self.adapter, sample.batch, sample.suffix, init,
                           config.lr, config.max_steps, config.early_stop, config.stop_margin, progress)

    def retract(self, fact_id: str) -> None:
        """Remove a fact's entry; radii it cut get back what they had without it."""
        self.codebook.remove(fact_id)

    def _negative_queries(self, fact: Fact, query: Query) -> list[Query]:
        negatives = []
        for negative in fact.negatives:
            question = negative.question if negative.question is not None else fact.question
            image = negative.image if negative.image is not None else query.image
            negatives.append(self.backbone.query(image, question))
        if query.image is not None and self.config.black_image_negative:
            negatives.append(Query(black_image(query.image), fact.question))
        return negatives

    def _pool_index(self) -> _PoolIndex:
        if self._pool is None:
            queries = [Query(item.image, item.question) for item in self.reference_pool]
            keys = self.keys(queries)
            answers = [normalise_answer(a.text) for a in self._generate(queries, "off")]
            self._pool = _PoolIndex(keys, answers)
        return self._pool

    def _unedited_answer(self, query: Query) -> tuple[str, list[int]]:
        """The unedited model's greedy answer: its text, and its tokens (with the end of sequence
        when generation ended by itself, not by reaching max_new_tokens)."""
        batch = self.backbone.encode([query])
        with torch.no_grad(), self.adapter.scope(batch.key_positions, mode="off"):
            tokens = self.backbone.generate_ids(batch, self.config.max_new_tokens)[0]
        ended = len(tokens) < self.config.max_new_tokens
        return self.backbone.decode(tokens), tokens + ([self.backbone.eos_token_id] if ended else [])

    def _hard_negative_keys(self, key: torch.Tensor, query: Query, original: str,
                            original_tokens: Sequence[int]) -> torch.Tensor:
        """Keys of the `num_hard_negatives` inputs nearest to `key` that the unedited model answers
        differently.

        Candidates: the pool's own inputs (answers known from the pool index), and the pool's other
        questions asked about the fact's image (other questions about the edited image must not
        inherit the edit), whose answers need a pass through the model. One prompt-only pass over
        the candidates gives their keys and their first greedy answer tokens: a candidate whose
        first token is not the unedited answer's first token answers differently. The others are
        checked token by token after their cached prompts, and only when they could be chosen:
        when the pool already holds `num_hard_negatives` inputs that differ, a candidate at or
        beyond the farthest of those nearest ones cannot be.
        """
        count = self.config.num_hard_negatives
        if not self.reference_pool or count == 0:
            return torch.zeros(0, self.spec.input_size)
        pool = self._pool_index()
        candidates = self._same_image_candidates(query)
        target = normalise_answer(original)
        differs = [answer != target for answer in pool.answers]
        pool_distance = pairwise_distances(key[None], pool.keys, self.config.distance)[0]  # (P,)
        known = sorted(float(d) for d, differ in zip(pool_distance, differs, strict=True) if differ)
        # At equal distance the stable order below puts pool inputs first: strictly nearer only.
        limit = known[count - 1] if len(known) >= count else float("inf")
        candidate_keys, first_tokens, prompts = self._first_tokens_and_keys(candidates)  # (S, Din), (S,)
        candidate_distance = pairwise_distances(key[None], candidate_keys, self.config.distance)[0]  # (S,)
        first_differs = (first_tokens != original_tokens[0]).tolist()
        undecided = [i for i in range(len(candidates))
                     if not first_differs[i] and float(candidate_distance[i]) < limit]
        agrees = self._agreement_after_first_token(candidates, prompts, undecided, original_tokens)
        differs += [first_differs[i] or not agrees.get(i, True) for i in range(len(candidates))]
        keys = torch.cat([pool.keys, candidate_keys])  # (P + S, Din)
        distance = torch.cat([pool_distance, candidate_distance])  # (P + S,): the same numbers as above
        chosen = [i for i in torch.argsort(distance, stable=True).tolist() if differs[i]][:count]
        return keys[chosen]

    def _cache_argument(self) -> str | None:
        """The name under which the model's forward takes a key/value cache; None when it takes
        none (BLIP-2, whose language model sits behind the Q-Former's inputs)."""
        parameters = inspect.signature(self.backbone.model.forward).parameters
        return next((name for name in ("cache", "past_key_values") if name in parameters), None)

    def _first_tokens_and_keys(self, queries: Sequence[Query]
                               ) -> tuple[torch.Tensor, torch.Tensor, list[_PromptPass]]:
        """Keys of `queries` (the numbers `keys` gives: the same batches, the same layers up to
        the edited one), the unedited model's first greedy answer token for each, and each batch's
        prompts with the model's cache after them. -> ((S, Din), (S,), batches)"""
        if not queries:
            return torch.zeros(0, self.spec.input_size), torch.zeros(0, dtype=torch.long), []
        cache_argument = self._cache_argument()
        extra: dict[str, Any] = {"use_cache": cache_argument is not None}
        if "logits_to_keep" in inspect.signature(self.backbone.model.forward).parameters:
            extra["logits_to_keep"] = 1  # left padding: every prompt ends at the last position
        keys: list[torch.Tensor] = []
        firsts: list[torch.Tensor] = []
        prompts: list[_PromptPass] = []
        for start in range(0, len(queries), INFERENCE_BATCH):
            batch = self.backbone.encode(queries[start : start + INFERENCE_BATCH])
            assert bool((batch.key_positions == batch.input_ids.shape[1] - 1).all())
            with torch.no_grad(), self.adapter.scope(batch.key_positions, mode="off") as state:
                output = self.backbone.model(**self.backbone.model_inputs(batch), **extra)
            firsts.append(output.logits[:, -1].argmax(-1).cpu())  # (B,)
            assert state.keys is not None
            keys.append(state.keys)
            cache = output.get("cache", output.get("past_key_values")) if cache_argument else None
            prompts.append(_PromptPass(start, batch, cache))
        return torch.cat(keys), torch.cat(firsts), prompts

    def _agreement_after_first_token(self, queries: Sequence[Query], prompts: Sequence[_PromptPass],
                                     rows: Sequence[int], tokens: Sequence[int]) -> dict[int, bool]:
        """Whether the unedited model's greedy output for each of `queries[rows]`, whose first
        token is `tokens[0]`, is `tokens` (which ends with the end of sequence unless generation was
        cut at max_new_tokens).

        Teacher-forced after each batch's cached prompts in chunks of 4, 8, 16, ... tokens: greedy
        generation yields `tokens` exactly when the argmax at every step is that step's token, and a
        row is dropped at the end of the chunk where it first differs, so it costs about as many
        answer steps as it agrees with `tokens`. A model without a cache checks the rows in one
        teacher-forced pass from their prompts."""
        if len(tokens) == 1:  # the first token is the whole answer
            return {row: True for row in rows}
        if rows and self._cache_argument() is None:
            return dict(zip(rows, self._agrees_with([queries[row] for row in rows], tokens), strict=True))
        agrees: dict[int, bool] = {}
        for prompt in prompts:
            local = [row - prompt.start for row in rows if 0 <= row - prompt.start < len(prompt.batch)]
            if local:
                for row, agree in zip(local, self._continue_teacher_forced(prompt, local, tokens), strict=True):
                    agrees[prompt.start + row] = agree
        return agrees

    def _continue_teacher_forced(self, prompt: _PromptPass, rows: list[int], tokens: Sequence[int]) -> list[bool]:
        """For batch rows `rows` of `prompt`: whether the argmax after `tokens[:j]` is `tokens[j]`
        for every j >= 1."""
        backbone = self.backbone
        device = backbone.device
        cache_argument = self._cache_argument()
        assert cache_argument is not None and prompt.cache is not None
        cache = prompt.cache
        live = list(range(len(rows)))  # positions in `rows` still agreeing
        cache.batch_select_indices(torch.tensor(rows, dtype=torch.long, device=device))
        mask = prompt.batch.attention_mask[rows]  # (R, T)
        agrees = [True] * len(rows)
        fed, chunk = 0, FIRST_CHUNK_TOKENS
        while live and fed < len(tokens) - 1:
            size = min(chunk, len(tokens) - 1 - fed)
            ids = torch.tensor([list(tokens[fed : fed + size])] * len(live))  # (R, size)
            mask = torch.cat([mask, torch.ones(len(live), size, dtype=mask.dtype)], dim=1)  # (R, T + fed + size)
            inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                                      cache_argument: cache, "use_cache": True}
            if backbone.family.passes_position_ids:  # as `model_inputs` numbers them
                inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)[:, -size:].to(device)
            # The keys were taken by the prompt pass: no row has its key in this call.
            with torch.no_grad(), self.adapter.scope(torch.full((len(live),), -1), mode="off"):
                logits = backbone.model(**inputs).logits  # (R, size, V)
            expected = torch.tensor(list(tokens[fed + 1 : fed + 1 + size]))  # (size,)
            same = (logits.argmax(-1).cpu() == expected).all(dim=1).tolist()  # (R,)
            for position, ok in zip(live, same, strict=True):
                agrees[position] = agrees[position] and ok
            keep = [j for j, ok in enumerate(same) if ok]
            if not keep:
                break
            if len(keep) < len(live):
                cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=device))
                mask = mask[keep]
                live = [live[j] for j in keep]
            fed += size
            chunk *= 2
        return agrees

    def _same_image_candidates(self, query: Query) -> list[Query]:
        """The pool's most frequent other questions, asked about the fact's image."""
        return [
            Query(query.image, q) for q in distinct_questions(self.reference_pool)
            if q.casefold() != query.question.casefold()
        ][:MAX_SAME_IMAGE_QUESTIONS]

    def _agrees_with(self, queries: Sequence[Query], tokens: Sequence[int]) -> list[bool]:
        """Whether the unedited model's greedy output for each query is `tokens`."""
        return self._keys_and_agreement(queries, tokens)[1]

    def _keys_and_agreement(self, queries: Sequence[Query], tokens: Sequence[int]) -> tuple[torch.Tensor, list[bool]]:
        """Keys of `queries`, and whether the unedited model's greedy output for each is `tokens`.

        One teacher-forced pass per batch instead of a generation (measured 1.6x faster on the
        demo model): greedy generation yields `tokens` exactly when the argmax at every step is
        that step's token (`tokens` ends with the end of sequence unless generation was cut at
        max_new_tokens).
        """
        if not queries:
            return torch.zeros(0, self.spec.input_size), []
        chunks: list[torch.Tensor] = []
        agrees: list[bool] = []
        for start in range(0, len(queries), INFERENCE_BATCH):
            rows = queries[start : start + INFERENCE_BATCH]
            batch = self.backbone.encode(rows, [list(tokens)] * len(rows))
            assert batch.targets is not None
            with torch.no_grad(), self.adapter.scope(batch.key_positions, mode="off") as state:
                logits = self.backbone.model(**self.backbone.model_inputs(batch), use_cache=False).logits
            steps = batch.key_positions.unsqueeze(1) + torch.arange(batch.targets.shape[1])  # (B, L)
            predicted = logits.argmax(-1).cpu().gather(1, steps)  # (B, L)
            agrees.extend((predicted == batch.targets).all(dim=1).tolist())
            assert state.keys is not None
            chunks.append(state.keys)
        return torch.cat(chunks), agrees
