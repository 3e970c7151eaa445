"""Checks on untrusted images (files or bytes): size, format and pixel count before decoding.

Imports only PIL and the standard library, so that code without torch (the daemon's queue) can
use the same checks as the editor. Every message names the image by the name the caller gives
(a path or a file name), never by a buffer's repr.
"""

from __future__ import annotations

import io
from collections.abc import Collection
from pathlib import Path

from PIL import Image

from editor.errors import InvalidFactError

MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 50 * 1024 * 1024
# Formats a service may restrict untrusted uploads to (`allowed_formats`); the editor itself
# accepts every format PIL decodes.
COMMON_IMAGE_FORMATS = frozenset({"PNG", "JPEG", "GIF", "BMP", "WEBP"})


def check_image(
    data: bytes,
    name: str,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    allowed_formats: Collection[str] | None = None,
) -> Image.Image:
    """Decode untrusted image bytes and return the image, fully loaded, in its own mode.

    The byte size is checked first, then the format and the pixel count from the header (before
    any pixel is decoded), then the whole image is decoded so that a truncated file is refused
    here and not later. `allowed_formats` holds PIL format names (e.g. `COMMON_IMAGE_FORMATS`);
    None accepts every format PIL reads. Raises `InvalidFactError` naming `name`.
    """
    if len(data) > max_bytes:
        raise InvalidFactError(f"image {name!r} is {len(data):,} bytes; the limit is {max_bytes:,}")
    buffer = io.BytesIO(data)
    try:
        image = Image.open(buffer)
        if allowed_formats is not None and image.format not in allowed_formats:
            raise InvalidFactError(
                f"image {name!r} is {image.format}; use {_format_list(allowed_formats)}"
            )
        if image.width * image.height > max_pixels:
            raise InvalidFactError(
                f"image {name!r} has {image.width}x{image.height} pixels; the limit is {max_pixels:,}"
            )
        image.load()
    except InvalidFactError:
        raise
    except Exception as exc:  # noqa: BLE001  (PIL raises many types for damaged files)
        # PIL names the file it read in some messages: name it as the caller does, not the buffer.
        detail = str(exc).replace(repr(buffer), repr(name))
        raise InvalidFactError(
            f"image {name!r} is not a readable image ({type(exc).__name__}: {detail})"
        ) from exc
    return image


def read_image_file(
    path: str | Path,
    name: str | None = None,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    allowed_formats: Collection[str] | None = None,
) -> tuple[bytes, Image.Image]:
    """Read an untrusted image file and check it like `check_image`: (its bytes, the image).

    The file's size is checked before it is read. `name` is what messages call the file
    (default: `path` as given).
    """
    label = str(path) if name is None else name
    candidate = Path(path)
    if not candidate.exists():
        raise InvalidFactError(f"image {label!r} does not exist")
    if not candidate.is_file():
        raise InvalidFactError(f"image {label!r} is not a regular file")
    size = candidate.stat().st_size
    if size > max_bytes:
        raise InvalidFactError(f"image {label!r} is {size:,} bytes; the limit is {max_bytes:,}")
    data = candidate.read_bytes()
    image = check_image(
        data, label, max_bytes=max_bytes, max_pixels=max_pixels, allowed_formats=allowed_formats
    )
    return data, image


def _format_list(formats: Collection[str]) -> str:
    names = sorted(formats)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
