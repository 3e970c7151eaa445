"""The codebook: keys, per-step values, radii and the facts they came from, with exact round trips.

Serialised as safetensors bytes (no pickle) with a JSON header in the safetensors metadata:
format version, model id, edited layer, layer shape, distance and hyperparameters, plus one record
per entry (fact id, normalised answer, input fingerprint, base radius).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from editor.config import Distance
from editor.errors import EditorError, IncompatibleCodebookError
from editor.radius import arrive, resolve_overlaps

FORMAT_VERSION = 1
FORMAT_NAME = "kb-daemon-codebook"


@dataclass(frozen=True)
class CodebookSpec:
    """What a codebook is bound to: the base model and the layer it edits."""

    model_id: str
    layer: str
    input_size: int
    output_size: int
    distance: Distance

    def check_compatible(self, other: CodebookSpec) -> None:
        """Raise `IncompatibleCodebookError` naming the first field that differs."""
        for name in ("model_id", "layer", "input_size", "output_size", "distance"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise IncompatibleCodebookError(
                    f"codebook was built for {name}={theirs!r} but this editor has {name}={mine!r}; "
                    "load it onto the model and layer it was made for"
                )


@dataclass(frozen=True)
class Entry:
    """One fact in the codebook. `values` holds one output vector per answer step."""

    fact_id: str
    answer: str  # normalised
    input_id: str  # fingerprint of the fact's (image, question)
    key: torch.Tensor  # (Din,)
    values: torch.Tensor  # (L, Dout): step 0 replaces the prompt's last token, step j answer token j-1
    base_radius: float  # the radius chosen when the entry was added


@dataclass
class Codebook:
    spec: CodebookSpec
    hparams: dict[str, Any] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    # Derived from `entries` by `_refresh`; never set directly.
    keys: torch.Tensor = field(init=False)
    radii: torch.Tensor = field(init=False)
    cut_by: tuple[tuple[int, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        self._refresh()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def fact_ids(self) -> list[str]:
        return [e.fact_id for e in self.entries]

    def _refresh(self) -> None:
        if self.entries:
            self.keys = torch.stack([e.key for e in self.entries])  # (N, Din)
            base = torch.tensor([e.base_radius for e in self.entries], dtype=torch.float32)
            split = resolve_overlaps(
                self.keys, base, [e.answer for e in self.entries], self.spec.distance
            )
            self.radii, self.cut_by = split.radii, split.cut_by
        else:
            self.keys = torch.zeros(0, self.spec.input_size)
            self.radii = torch.zeros(0)
            self.cut_by = ()
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def index_of(self, fact_id: str) -> int:
        for i, entry in enumerate(self.entries):
            if entry.fact_id == fact_id:
                return i
        raise EditorError(f"no entry for fact {fact_id!r} in the codebook")

    def add(self, entry: Entry) -> tuple[list[str], list[str]]:
        """Add an entry; an older entry for the same input is superseded (removed).

        Returns (superseded fact ids, fact ids whose radius the new entry cut or that cut it).
        """
        if entry.key.shape != (self.spec.input_size,):
            raise IncompatibleCodebookError(
                f"key of shape {tuple(entry.key.shape)} does not fit layer input size {self.spec.input_size}"
            )
        if entry.values.ndim != 2 or entry.values.shape[1] != self.spec.output_size:
            raise IncompatibleCodebookError(
                f"values of shape {tuple(entry.values.shape)} do not fit layer output size {self.spec.output_size}"
            )
        superseded = [e.fact_id for e in self.entries if e.input_id == entry.input_id]
        remaining = [e for e in self.entries if e.input_id != entry.input_id]
        if any(e.fact_id == entry.fact_id for e in remaining):
            raise EditorError(f"fact id {entry.fact_id!r} is already in the codebook")
        self.entries = remaining
        # clone(): a key is often a row of a larger batch tensor, whose storage would stay alive.
        stored = Entry(entry.fact_id, entry.answer, entry.input_id,
                       entry.key.detach().float().cpu().clone(),
                       entry.values.detach().float().cpu().clone(),
                       float(torch.tensor(entry.base_radius, dtype=torch.float32)))
        if superseded:
            self.entries.append(stored)
            self._refresh()
        else:  # the common case: only the new entry's arrival needs the overlap rule
            self.entries.append(stored)
            self.keys = torch.cat([self.keys, stored.key[None]])  # (N, Din)
            self.radii = torch.cat([self.radii, torch.tensor([stored.base_radius])])  # (N,)
            codes = {}
            code_list = [codes.setdefault(e.answer, len(codes)) for e in self.entries]
            cut_by = [list(c) for c in self.cut_by] + [[]]
            arrive(self.keys, self.radii, torch.tensor(code_list), len(self.entries) - 1,
                   self.spec.distance, cut_by)
            self.cut_by = tuple(tuple(c) for c in cut_by)
            self._device_cache = {}
        new = len(self.entries) - 1
        touched = set(self.cut_by[new]) | {j for j, cuts in enumerate(self.cut_by) if new in cuts}
        return superseded, [self.entries[j].fact_id for j in sorted(touched)]

    def remove(self, fact_id: str) -> None:
        """Remove a fact's entry; the radii it cut are restored by replaying the overlap rule."""
        index = self.index_of(fact_id)
        del self.entries[index]
        self._refresh()

    def lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each query, the nearest entry whose ball contains it, else -1.

        queries (B, Din) -> (entry index (B,) int64, distance to it (B,) float; inf when none).
        Only the B x N distances at key positions are computed, never B x T x N: one matrix
        product against keys prepared once per device (squared norms, or unit keys for cosine).
        """
        if not self.entries:
            n = queries.shape[0]
            return torch.full((n,), -1, dtype=torch.long), torch.full((n,), float("inf"))
        keys, norms, radii = self._on_device(queries.device)
        q = queries.float()  # (B, Din)
        if self.spec.distance == "cosine":
            dist = (1.0 - torch.nn.functional.normalize(q, dim=-1) @ keys.T).clamp_min_(0.0)  # (B, N)
        else:
            squared = torch.addmm(norms.unsqueeze(0), q, keys.T, alpha=-2.0)  # (B, N)
            dist = squared.add_((q * q).sum(dim=1, keepdim=True)).clamp_min_(0.0).sqrt_()  # (B, N)
        masked = dist.masked_fill_(dist > radii.unsqueeze(0), float("inf"))  # (B, N)
        best_dist, best = masked.min(dim=1)  # (B,), (B,)
        best = torch.where(torch.isfinite(best_dist), best, torch.full_like(best, -1))
        return best.cpu(), best_dist.cpu()

    def _on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, squared key norms, radii) on `device`; unit keys (and unused norms) for cosine."""
        if device not in self._device_cache:
            keys = self.keys.to(device=device, dtype=torch.float32)
            if self.spec.distance == "cosine":
                keys = torch.nn.functional.normalize(keys, dim=-1)
            self._device_cache[device] = (keys, (keys * keys).sum(dim=1), self.radii.to(device))
        return self._device_cache[device]

    def copy(self) -> Codebook:
        return Codebook(self.spec, dict(self.hparams), list(self.entries))

    def to_bytes(self) -> bytes:
        """safetensors bytes; identical codebooks give identical bytes."""
        n = len(self.entries)
        lengths = [int(e.values.shape[0]) for e in self.entries]
        tensors = {
            "keys": self.keys.contiguous() if n else torch.zeros(0, self.spec.input_size),
            "values": torch.cat([e.values for e in self.entries]).contiguous()
            if n else torch.zeros(0, self.spec.output_size),
            "value_lengths": torch.tensor(lengths, dtype=torch.int64),
            "base_radii": torch.tensor([e.base_radius for e in self.entries], dtype=torch.float32),
        }
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "spec": {
                "model_id": self.spec.model_id,
                "layer": self.spec.layer,
                "input_size": self.spec.input_size,
                "output_size": self.spec.output_size,
                "distance": self.spec.distance,
            },
            "hparams": self.hparams,
            "entries": [
                {"fact_id": e.fact_id, "answer": e.answer, "input_id": e.input_id} for e in self.entries
            ],
        }
        return save_safetensors(tensors, metadata={"kb_codebook": json.dumps(header, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Codebook:
        """Inverse of `to_bytes`. Foreign or damaged bytes raise `IncompatibleCodebookError`."""
        try:
            tensors = load_safetensors(data)
            header = json.loads(_safetensors_metadata(data)["kb_codebook"])
        except IncompatibleCodebookError:
            raise
        except Exception as exc:  # safetensors raises several types for damaged input
            raise IncompatibleCodebookError(f"not a kb-daemon codebook: {exc}") from exc
        if header.get("format") != FORMAT_NAME or header.get("format_version") != FORMAT_VERSION:
            raise IncompatibleCodebookError(
                f"codebook format {header.get('format')!r} version {header.get('format_version')!r} "
                f"is not supported; this editor reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        spec = CodebookSpec(**header["spec"])
        records = header["entries"]
        lengths = tensors["value_lengths"].tolist()
        if not (len(records) == len(lengths) == tensors["keys"].shape[0] == tensors["base_radii"].shape[0]):
            raise IncompatibleCodebookError("codebook is inconsistent: entry counts differ between fields")
        values = torch.split(tensors["values"], lengths) if records else []
        entries = [
            Entry(r["fact_id"], r["answer"], r["input_id"], tensors["keys"][i].clone(),
                  values[i].clone(), float(tensors["base_radii"][i]))
            for i, r in enumerate(records)
        ]
        return cls(spec, header.get("hparams", {}), entries)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """Read the metadata block of safetensors bytes (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise IncompatibleCodebookError("codebook bytes are truncated")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise IncompatibleCodebookError("codebook header is truncated")
    meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    if "kb_codebook" not in meta:
        raise IncompatibleCodebookError("safetensors bytes carry no kb-daemon codebook header")
    return meta


def entry_tensors_to_bytes(entry: Entry) -> bytes:
    """An entry's key and values as safetensors bytes (the daemon stores each entry once)."""
    return save_safetensors({"key": entry.key.contiguous(), "values": entry.values.contiguous()})


def entry_from_bytes(
    data: bytes, fact_id: str, answer: str, input_id: str, base_radius: float
) -> Entry:
    """Inverse of `entry_tensors_to_bytes`, with the fields stored beside the bytes."""
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises several types for damaged input
        raise IncompatibleCodebookError(f"entry tensors of fact {fact_id!r} are unreadable: {exc}") from exc
    if set(tensors) != {"key", "values"}:
        raise IncompatibleCodebookError(f"entry tensors of fact {fact_id!r} hold {sorted(tensors)}")
    return Entry(fact_id, answer, input_id, tensors["key"], tensors["values"], base_radius)
