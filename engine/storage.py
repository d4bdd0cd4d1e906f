"""Local paths and s3:// URIs through fsspec; credentials come from the usual AWS environment or profile."""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from engine.errors import InputError


def filesystem(uri: str, storage_options: dict[str, str] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it). Options such as endpoint_url go to s3fs."""
    try:
        return url_to_fs(uri, **dict(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise InputError(f"cannot open {uri!r}: {exc}") from None


def join(fs: fsspec.AbstractFileSystem, base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if _is_remote(fs) else posixpath.join(base, *parts)


def _is_remote(fs: fsspec.AbstractFileSystem) -> bool:
    protocol: Any = fs.protocol
    protocols = protocol if isinstance(protocol, (tuple, list)) else (protocol,)
    return not ({"file", "local"} & set(protocols))


def is_remote(fs: fsspec.AbstractFileSystem) -> bool:
    return _is_remote(fs)


def describe_error(exc: BaseException) -> str:
    """One line for storage failures (no such bucket, access denied, missing file), without credentials."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, FileNotFoundError):
        return f"not found ({text or name}); check the path or bucket name"
    if isinstance(exc, PermissionError):
        return f"access denied ({text or name}); check AWS credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE) and bucket policy"
    return f"{name}: {text}"
