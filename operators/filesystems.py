"""Open local paths and object-store URIs through pyarrow's file systems."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pyarrow.fs as pafs

from schemas.errors import SourceError


def _s3_options(options: Mapping[str, str]) -> dict[str, object]:
    """Translate Lance-style object-store options into pyarrow's S3FileSystem arguments."""
    out: dict[str, object] = {}
    if "aws_endpoint" in options:
        endpoint = options["aws_endpoint"]
        scheme, _, rest = endpoint.partition("://")
        out["endpoint_override"] = rest or endpoint
        out["scheme"] = scheme if rest else "https"
    if "aws_region" in options:
        out["region"] = options["aws_region"]
    if "aws_access_key_id" in options:
        out["access_key"] = options["aws_access_key_id"]
    if "aws_secret_access_key" in options:
        out["secret_key"] = options["aws_secret_access_key"]
    return out


def resolve(
    uri: str, storage_options: Mapping[str, str] | None = None
) -> tuple[pafs.FileSystem, str]:
    """Return the file system and the path inside it for a local path or a URI.

    Local paths are made absolute so that Ray workers in another directory find them.

    >>> fs, path = resolve("/tmp")
    >>> type(fs).__name__, path
    ('LocalFileSystem', '/tmp')
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    scheme = uri.split("://", 1)[0]
    options = dict(storage_options or {})
    try:
        if scheme == "s3" and options:
            fs = pafs.S3FileSystem(**_s3_options(options))
            return fs, uri.split("://", 1)[1]
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as err:
        raise SourceError(f"{uri}: cannot open this location: {err}") from None


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return "://" not in uri or uri.startswith("file://")


def beside(table_uri: str, suffix: str) -> str:
    """The path of something kept next to a table: `x.lance` → `x{suffix}`.

    >>> beside("s3://b/docs.lance", ".excluded.lance"), beside("t", ".listing.json")
    ('s3://b/docs.excluded.lance', 't.listing.json')
    """
    base = table_uri[: -len(".lance")] if table_uri.endswith(".lance") else table_uri
    return f"{base}{suffix}"
