"""Request bodies turned into what the service takes: images checked, text cleaned, archives unpacked.

Every refusal is an `InvalidInput` (or `TooLarge`) with one line that names the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request

from kb_daemon.config import Settings
from kb_daemon.errors import InvalidInput, KbError
from kb_daemon.queue import MAX_QUESTION_CHARS, check_image_bytes, clean_text

# The image types a data URL may declare; the bytes are checked against the same formats.
DATA_URL_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp", "image/bmp"}
DATA_URL = re.compile(r"data:(?P<type>[\w.+/-]+)(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)",
                      re.DOTALL)
# An uploaded ingestion archive: at most this many files and this many bytes once unpacked.
MAX_ARCHIVE_FILES = 100_000
MAX_ARCHIVE_BYTES = 2 * 1024**3


class TooLarge(KbError):
    """A request or an archive beyond the configured size."""


async def read_form(request: Request, settings: Settings) -> FormData:
    """The request's form, with at most as many files and as many fields as a fact with the most
    rephrases and negatives the settings allow can use; a form with more is refused (400, Starlette's
    "Too many fields/files" message) while it is parsed. The API and the console read their forms
    here, so both accept the same forms."""
    limit = 4 + 2 * (settings.max_rephrases_per_fact + settings.max_negatives_per_fact)
    return await request.form(max_files=limit, max_fields=limit)


def decode_base64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{field} is not valid base64 ({exc})") from exc


def decode_data_url(url: str, field: str) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL; anything else is refused (nothing is fetched)."""
    match = DATA_URL.fullmatch(url.strip())
    if match is None:
        shown = url[:40] + ("..." if len(url) > 40 else "")
        raise InvalidInput(f"{field} must be a data URL (data:image/png;base64,...), got {shown!r}; "
                           "the server fetches nothing")
    media = match["type"].lower()
    if media not in DATA_URL_TYPES:
        raise InvalidInput(f"{field} is {media}; use image/png, image/jpeg, image/gif, image/webp or image/bmp")
    if not match["b64"]:
        raise InvalidInput(f"{field} must be base64-encoded (data:{media};base64,...)")
    return decode_base64(match["data"], field)


def open_image(data: bytes, name: str, settings: Settings) -> Any:
    """Check untrusted image bytes (size, format, pixels) and return the image in RGB."""
    return check_image_bytes(data, name, settings).convert("RGB")


def question_text(value: Any, field: str = "question") -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string")
    return clean_text(value, field, MAX_QUESTION_CHARS)


@dataclass(frozen=True)
class ChatInput:
    image: bytes | None
    question: str


def chat_input(messages: list[dict[str, Any]]) -> ChatInput:
    """The question and image of an OpenAI chat request: the last user message, whose content is a
    string or a list of `text` and `image_url` parts (one image at most, as a data URL)."""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise InvalidInput("messages holds no user message")
    content = users[-1].get("content")
    if isinstance(content, str):
        return ChatInput(None, question_text(content, "message content"))
    if not isinstance(content, list):
        raise InvalidInput("the user message's content must be a string or a list of parts")
    texts: list[str] = []
    images: list[bytes] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise InvalidInput(f"content part {i}: image_url.url must be a string")
            images.append(decode_data_url(url, f"content part {i} image_url"))
        else:
            raise InvalidInput(f"content part {i}: type must be 'text' or 'image_url', got {kind!r}")
    if len(images) > 1:
        raise InvalidInput(f"{len(images)} images in one message; the model answers about one image at a time")
    if not texts:
        raise InvalidInput("the user message has no text part (the question)")
    return ChatInput(images[0] if images else None, question_text(" ".join(texts), "message text"))


def model_reference(value: Any) -> tuple[str, int | None]:
    """`name` or `name@V` (a pinned version)."""
    if not isinstance(value, str) or not value:
        raise InvalidInput("model must be a registered model name, or NAME@VERSION")
    name, sep, version = value.partition("@")
    if not sep:
        return name, None
    if not version.isdigit():
        raise InvalidInput(f"model {value!r}: the version after '@' must be a number, e.g. {name}@3")
    return name, int(version)


def unpack_archive(data: bytes, filename: str, into: Path) -> int:
    """Unpack an uploaded .zip or .tar[.gz|.bz2|.xz] of images under `into`; returns the file count.

    Only regular files and folders; a member whose path is absolute or climbs out with '..' is
    refused, as are archives over MAX_ARCHIVE_FILES files or MAX_ARCHIVE_BYTES unpacked."""
    buffer = io.BytesIO(data)
    if zipfile.is_zipfile(buffer):
        with zipfile.ZipFile(buffer) as archive:
            members = [(m.filename, m.file_size, m.is_dir(), m) for m in archive.infolist()]
            _check_members(filename, [(n, size) for n, size, is_dir, _m in members if not is_dir])
            for name, _size, is_dir, member in members:
                if not is_dir:
                    _write(into, name, archive.read(member))
            return sum(1 for m in members if not m[2])
    buffer.seek(0)
    try:
        archive_tar = tarfile.open(fileobj=buffer, mode="r:*")
    except tarfile.TarError as exc:
        raise InvalidInput(f"images archive {filename!r} is neither a zip nor a tar file") from exc
    with archive_tar:
        files: list[tarfile.TarInfo] = []
        for info in archive_tar.getmembers():
            if info.isdir():
                continue
            if not info.isfile():
                raise InvalidInput(f"images archive {filename!r}: {info.name!r} is a link or device; "
                                   "only files and folders are accepted")
            files.append(info)
        _check_members(filename, [(m.name, m.size) for m in files])
        for info in files:
            handle = archive_tar.extractfile(info)
            assert handle is not None
            _write(into, info.name, handle.read())
        return len(files)


def _check_members(filename: str, members: list[tuple[str, int]]) -> None:
    if len(members) > MAX_ARCHIVE_FILES:
        raise TooLarge(f"images archive {filename!r} holds {len(members):,} files; the limit is {MAX_ARCHIVE_FILES:,}")
    total = sum(size for _name, size in members)
    if total > MAX_ARCHIVE_BYTES:
        raise TooLarge(f"images archive {filename!r} unpacks to {total:,} bytes; the limit is {MAX_ARCHIVE_BYTES:,}")
    for name, _size in members:
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise InvalidInput(f"images archive {filename!r}: member path {name!r} leaves the archive's folder")


def _write(root: Path, name: str, data: bytes) -> None:
    target = root.joinpath(*PurePosixPath(name.replace("\\", "/")).parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def upload_name(filename: str | None, allowed: tuple[str, ...], field: str) -> str:
    """A safe base name for an uploaded file, with one of the `allowed` suffixes."""
    name = Path((filename or "").replace("\\", "/")).name
    if not name or not name.lower().endswith(allowed):
        raise InvalidInput(f"{field} must be a file named *{' or *'.join(allowed)}, got {filename!r}")
    if not re.fullmatch(r"[\w.@+-]{1,200}", name):
        raise InvalidInput(f"{field} name {filename!r} may use letters, digits and . _ - @ + only")
    return name
