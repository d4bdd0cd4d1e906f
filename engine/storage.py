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


def bucket_of(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The bucket of a remote path (s3://bucket/key -> bucket), None for local paths."""
    return path.lstrip("/").split("/", 1)[0] if _is_remote(fs) else None


def describe_missing(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Why `path` is not there: for object stores, tell a missing bucket from a missing prefix."""
    bucket = bucket_of(fs, path)
    if bucket and bucket != path.strip("/"):
        try:
            bucket_exists = fs.exists(bucket)
        except Exception as exc:  # noqa: BLE001 - access denied on the bucket is the better answer
            return describe_error(exc)
        if not bucket_exists:
            return f"bucket {bucket!r} does not exist; check the bucket name (and storage_options.endpoint_url for S3-compatible stores)"
        return f"nothing at {path!r} in bucket {bucket!r}; check the prefix"
    if bucket:
        return f"bucket {bucket!r} does not exist; check the bucket name (and storage_options.endpoint_url for S3-compatible stores)"
    return f"not found ({path}); check the path"


def require_bucket(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Writing to a missing bucket must fail: s3fs would otherwise create it (a typo becomes a new bucket)."""
    bucket = bucket_of(fs, path)
    if bucket and not fs.exists(bucket):
        raise FileNotFoundError(f"bucket {bucket!r} does not exist; create it first or check the bucket name "
                                "(and storage_options.endpoint_url for S3-compatible stores)")


def describe_error(exc: BaseException) -> str:
    """One line for storage failures (no such bucket, access denied, missing file), without credentials."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, FileNotFoundError):
        return text if text.startswith("bucket ") else f"not found ({text or name}); check the path or bucket name"
    if isinstance(exc, PermissionError):
        return f"access denied ({text or name}); check the AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the bucket policy"
    if _is_missing_credentials(exc):
        return "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    return f"{name}: {text}"


def _is_missing_credentials(exc: BaseException) -> bool:
    return type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError")
