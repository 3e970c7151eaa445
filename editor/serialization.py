"""The codebook's byte format: safetensors tensors plus a JSON header in the safetensors metadata.

This module knows bytes, tensors and the header's envelope (format name and version); the
codebook (`editor.codebook`) decides what goes into them. No pickle anywhere: a codebook's bytes
can be loaded from an untrusted store.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.numpy import save as _save_numpy
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as _save_torch

from editor.errors import IncompatibleCodebookError

FORMAT_VERSION = 1
FORMAT_NAME = "kb-daemon-codebook"
HEADER_KEY = "kb_codebook"  # the safetensors metadata field that holds the JSON header


def save_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of tensors (made contiguous here): byte for byte what `safetensors.torch.save` writes.

    `safetensors.torch.save` (0.8) reads each tensor through `numpy.ctypeslib.as_array`, which makes
    a ctypes array type per distinct byte length, and ctypes keeps every such type for the life of
    the process: 3,000 saves of distinct sizes leave RSS 17 MiB higher (about 5.8 KB per size).
    A codebook has a new size every time it grows, so a process that saved it after each edit
    would leak at every save. Handing numpy views to `safetensors.numpy.save` makes no types; only
    dtypes numpy lacks (bfloat16, float8) still go through `safetensors.torch.save`.
    """
    dense = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    try:
        arrays = {name: tensor.numpy() for name, tensor in dense.items()}
    except TypeError:  # a dtype numpy does not have, or a tensor off the CPU
        return _save_torch(dense, metadata=metadata)
    return _save_numpy(arrays, metadata=metadata)


def pack(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> bytes:
    """Codebook bytes: `tensors`, and `header` stamped with the format name and version.

    The JSON is written with sorted keys, so equal inputs give identical bytes.
    """
    stamped = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **header}
    return save_tensors(tensors, metadata={HEADER_KEY: json.dumps(stamped, sort_keys=True)})


def unpack(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Inverse of `pack`: (header, tensors). Foreign, damaged or other-version bytes raise
    `IncompatibleCodebookError`."""
    try:
        tensors = load_safetensors(data)
        header = json.loads(_metadata(data)[HEADER_KEY])
    except IncompatibleCodebookError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged input
        raise IncompatibleCodebookError(f"not a kb-daemon codebook: {exc}") from exc
    if header.get("format") != FORMAT_NAME or header.get("format_version") != FORMAT_VERSION:
        raise IncompatibleCodebookError(
            f"codebook format {header.get('format')!r} version {header.get('format_version')!r} "
            f"is not supported; this editor reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    return header, tensors


def _metadata(data: bytes) -> dict[str, str]:
    """Read the metadata block of safetensors bytes (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise IncompatibleCodebookError("codebook bytes are truncated")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise IncompatibleCodebookError("codebook header is truncated")
    meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    if HEADER_KEY not in meta:
        raise IncompatibleCodebookError("safetensors bytes carry no kb-daemon codebook header")
    return meta
