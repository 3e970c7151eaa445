"""Method names, `KEY=VALUE` parsing, and one frozen config per baseline (no torch imported).

BalancEdit and GRACE take `editor.EditConfig`'s fields plus `pool_size` (how many reference-pool
items the editor mines hard negatives from). The baselines' configs follow.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

from editor.config import EditConfig
from editor.errors import ConfigError
from editor.eval.errors import HparamError, UnknownMethodError

MethodName = Literal["balancedit", "grace", "ft", "mend", "ike"]
METHODS: tuple[str, ...] = get_args(MethodName)
CODEBOOK_METHODS = ("balancedit", "grace")


def check_method(name: str) -> str:
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return name


def parse_hparams(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["alpha=0.1", "distance=cosine"]` -> {"alpha": 0.1, "distance": "cosine"}.

    Values are read as JSON where they parse (numbers, true/false, null), else kept as strings.
    """
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise HparamError(f"--hparam {pair!r} is not KEY=VALUE (e.g. --hparam alpha=0.1)")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, (dict, list)):
            value = raw
        result[key] = value
    return result


def _from_dict(cls: type, method: str, values: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise HparamError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for {method}; valid: {', '.join(sorted(known))}"
        )
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    coerced = {}
    for key, value in values.items():
        kind = str(types[key])
        if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise HparamError(f"{key} must be a number, got {value!r}")
        if kind == "int" and isinstance(value, float):
            if not value.is_integer():
                raise HparamError(f"{key} must be an integer, got {value!r}")
            value = int(value)
        if kind == "bool" and not isinstance(value, bool):
            raise HparamError(f"{key} must be true or false, got {value!r}")
        coerced[key] = value
    return cls(**coerced)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise HparamError(f"{name} must be positive, got {value}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise HparamError(f"{name} must be at least {low}, got {value}")


@dataclass(frozen=True)
class CodebookOptions:
    """Harness knobs of BalancEdit / GRACE that are not `EditConfig` fields."""

    pool_size: int = 200  # reference-pool items handed to the Editor (0: no hard negatives)
    layer: str = ""  # the wrapped linear layer; "" for the backbone's default

    def __post_init__(self) -> None:
        _at_least("pool_size", self.pool_size, 0)


@dataclass(frozen=True)
class FineTuneConfig:
    """FT: Adam on the edited layer's weight (reference harness MMFT: lr 0.01, 25 steps)."""

    lr: float = 0.01
    max_steps: int = 25
    loss_threshold: float = 0.0  # stop once the training loss is below this (0: never, as the reference)
    weight_decay: float = 0.0
    adam_eps: float = 1e-4
    train_on_rephrases: bool = False  # the reference tunes on the edit input only
    max_new_tokens: int = 64
    layer: str = ""  # the fine-tuned linear layer; "" for the backbone's default (the codebook's)

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        _at_least("max_steps", self.max_steps, 1)
        _at_least("max_new_tokens", self.max_new_tokens, 1)


@dataclass(frozen=True)
class InContextConfig:
    """IKE: demonstrations and the new fact as text before the question; no weight changes."""

    num_demos: int = 4  # the reference uses k=32 with 7B models; tiny contexts fit few
    max_facts: int = 4  # applied facts put in context (sequential mode), most similar first
    max_prompt_tokens: int = 0  # 0: the model's position limit minus max_new_tokens
    max_new_tokens: int = 64
    num_demo_edits: int = 60  # development edits the demonstrations are drawn from
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least("num_demos", self.num_demos, 0)
        _at_least("max_facts", self.max_facts, 1)
        _at_least("max_prompt_tokens", self.max_prompt_tokens, 0)
        _at_least("max_new_tokens", self.max_new_tokens, 1)
        _at_least("num_demo_edits", self.num_demo_edits, 1)


@dataclass(frozen=True)
class MendConfig:
    """MEND: a gradient-transforming hypernetwork on the edited layer (Mitchell et al. 2022)."""

    rank: int = 64  # rank of each low-rank residual layer of the hypernetwork
    num_layers: int = 2  # low-rank residual layers (reference: n_hidden 1 -> 2 layers)
    meta_lr: float = 1e-3  # Adam lr of the hypernetwork while training
    edit_lr: float = 1e-2  # initial learned step size of the edit
    edit_lr_lr: float = 1e-3  # Adam lr of the learned step size
    cedit: float = 0.1  # weight of the edit loss (reference: 0.1)
    cloc: float = 1.0  # weight of the locality KL (reference: 1.0)
    train_steps: int = 400
    max_train_seconds: float = 240.0  # wall-clock cap on training
    num_train_edits: int = 120  # development edits built from the easy-VQA TRAIN split
    grad_clip: float = 100.0
    max_new_tokens: int = 64
    layer: str = ""  # the edited linear layer; "" for the backbone's default (the codebook's)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "num_layers", "train_steps", "num_train_edits", "max_new_tokens"):
            _at_least(name, getattr(self, name), 1)
        for name in ("meta_lr", "edit_lr", "max_train_seconds", "grad_clip"):
            _positive(name, getattr(self, name))
        if self.cedit < 0 or self.cloc < 0:
            raise HparamError("cedit and cloc must be 0 or more")


@dataclass(frozen=True)
class MethodSettings:
    """A validated method choice: the method and its config objects."""

    method: str
    edit_config: EditConfig | None = None
    codebook: CodebookOptions | None = None
    finetune: FineTuneConfig | None = None
    incontext: InContextConfig | None = None
    mend: MendConfig | None = None

    @property
    def max_new_tokens(self) -> int:
        """Generation length of the method, used for the unedited reference answers too."""
        for part in (self.edit_config, self.finetune, self.incontext, self.mend):
            if part is not None:
                return int(part.max_new_tokens)
        raise AssertionError("settings without a method config")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in (self.edit_config, self.codebook, self.finetune, self.incontext, self.mend):
            if part is not None:
                out.update(dataclasses.asdict(part))
        return out


def settings_for(method: str, hparams: dict[str, Any] | None = None) -> MethodSettings:
    """Validate `hparams` for `method`; raise `UnknownMethodError` / `HparamError` naming the fix."""
    check_method(method)
    values = dict(hparams or {})
    if method in CODEBOOK_METHODS:
        options = {
            k: values.pop(k)
            for k in list(values)
            if k in {f.name for f in dataclasses.fields(CodebookOptions)}
        }
        if "method" in values:
            raise HparamError("method is chosen with --method, not --hparam")
        try:
            edit = EditConfig.from_dict({"method": method, **values})
        except ConfigError as exc:
            raise HparamError(
                f"{exc} (or {', '.join(f.name for f in dataclasses.fields(CodebookOptions))})"
            ) from exc
        except TypeError as exc:
            raise HparamError(str(exc)) from exc
        return MethodSettings(method, edit_config=edit, codebook=_from_dict(CodebookOptions, method, options))
    if method == "ft":
        return MethodSettings(method, finetune=_from_dict(FineTuneConfig, method, values))
    if method == "ike":
        return MethodSettings(method, incontext=_from_dict(InContextConfig, method, values))
    return MethodSettings(method, mend=_from_dict(MendConfig, method, values))
