"""Method knobs of one editor, validated once at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from editor.errors import ConfigError

Method = Literal["balancedit", "grace"]
Distance = Literal["euclidean", "cosine"]
ValueInit = Literal["warm", "cold"]
OverlapRule = Literal["halve", "keep_positives"]
# The image part's weight in keys when `image_key_weight` is not given (chosen on the seed-0
# development file; docs/decisions.md).
DEFAULT_IMAGE_KEY_WEIGHT = 0.5


def _check_choice(name: str, value: object, literal: Any) -> None:
    choices = get_args(literal)
    if value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise ConfigError(f"{name} must be {options}, got {value!r}")


@dataclass(frozen=True)
class EditConfig:
    """Hyperparameters of the editing method. Paths, devices and URLs do not belong here."""

    method: Method = "balancedit"
    distance: Distance = "cosine"
    # Radius = (1 - alpha) * d_negative + alpha * d_positive: 0 puts the boundary on the nearest
    # negative (widest scope), 1 on the farthest positive (narrowest).
    alpha: float = 0.2
    lr: float = 0.5
    max_steps: int = 100
    # Stop the value optimisation as soon as every training input produces the whole answer.
    early_stop: bool = True
    # Early stopping also waits until every answer token's logit leads the runner-up by at least
    # this many nats, so the value keeps producing the answer when the context shifts a little
    # (another image in scope, a rephrasing). 0 stops as soon as every answer token is the argmax.
    # A margin, not a probability: the output head caps the probability of bytes the model never
    # produced in training (measured on the demo model: "x" and " " stay below 0.07).
    stop_margin: float = 1.0
    # "warm": start from the layer's own output at those positions; "cold": uniform noise (GRACE).
    value_init: ValueInit = "warm"
    # GRACE's fixed radius for every new entry; BalancEdit uses it only when a fact has neither
    # positives nor negatives to set a radius from.
    initial_radius: float = 1.0
    num_paraphrases: int = 4
    num_hard_negatives: int = 8
    black_image_negative: bool = True
    # Train the value on the rephrasings too, so that it carries over to them.
    train_on_rephrases: bool = True
    # How two overlapping entries with different answers share the distance between their keys
    # (`editor.radius.arrive`): "halve" cuts both to half of it (GRACE); "keep_positives" first
    # keeps, for each, the reach of its own rephrasings inside its radius and halves the rest.
    overlap_rule: OverlapRule = "halve"
    # The scope key. 0: the paper's, the edited layer's input at the prompt's last token. Above 0
    # (cosine distance only): that input, L2-normalised, followed by the mean of the image's
    # features as the text decoder receives them (a vision-language model's projector output),
    # L2-normalised and scaled by this weight, so that a key also sees what the image shows when
    # the layer's input barely does (bench/README.md, "Scope keys"). None: DEFAULT_IMAGE_KEY_WEIGHT
    # on a vision-language model with cosine distance, else 0 (`image_key_weight_for`).
    image_key_weight: float | None = None
    max_answer_tokens: int = 64  # answer tokens incl. end of sequence
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("method", self.method, Method)
        _check_choice("distance", self.distance, Distance)
        _check_choice("value_init", self.value_init, ValueInit)
        _check_choice("overlap_rule", self.overlap_rule, OverlapRule)
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not self.stop_margin >= 0.0:
            raise ConfigError(f"stop_margin must be 0 or more, got {self.stop_margin}")
        if self.image_key_weight is not None:
            if not self.image_key_weight >= 0.0:
                raise ConfigError(f"image_key_weight must be 0 or more, got {self.image_key_weight}")
            if self.image_key_weight > 0 and self.distance != "cosine":
                raise ConfigError("image_key_weight needs distance='cosine' (the key's parts are normalised)")
        if not self.initial_radius > 0:
            raise ConfigError(f"initial_radius must be positive, got {self.initial_radius}")
        for name in ("max_steps", "max_answer_tokens", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_new_tokens < self.max_answer_tokens:
            raise ConfigError(
                f"max_new_tokens ({self.max_new_tokens}) must be at least max_answer_tokens "
                f"({self.max_answer_tokens}), or edited answers would be cut off"
            )
        for name in ("num_paraphrases", "num_hard_negatives"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EditConfig:
        """Build from a mapping; unknown keys raise and name the valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown hyperparameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        if values.get("method") == "grace":
            # GRACE's published settings (Hartvigsen et al. 2023): Euclidean keys, cold values,
            # lr 1.0, 100 steps without early stopping.
            values = {"distance": "euclidean", "value_init": "cold", "lr": 1.0, "early_stop": False,
                      **values}
        return cls(**values)

    def image_key_weight_for(self, vision_language: bool) -> float:
        """The image part's weight in keys on a model with (or without) images."""
        if self.image_key_weight is not None:
            return float(self.image_key_weight)
        return DEFAULT_IMAGE_KEY_WEIGHT if vision_language and self.distance == "cosine" else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
