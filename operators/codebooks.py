"""Where a table's fitted first-stage code lives: one immutable file beside the table.

A fitted code (`operators.codecs.Codec`: a projection and levels or centroids, up to a
few MB) is too big for the table's schema metadata, which every Lance manifest repeats.
So its bytes go to `<table>.codebooks/<sha256>.npz`, named by their own digest, and the
manifest records the digest (`schemas.manifest.CodeManifest`). The file is written before
the table first names it and is never rewritten, so every version of the table that names
a digest can read it, and a file that does not hash to the digest (another fit's, or a
damaged copy) is refused by name instead of silently scoring against the wrong code.
"""

from __future__ import annotations

from collections.abc import Mapping

from operators.codecs import Codec, digest
from operators.filesystems import beside, resolve
from schemas.errors import ManifestMismatchError

CODEBOOKS_SUFFIX = ".codebooks"


def codebook_uri(table_uri: str, sha256: str) -> str:
    """The file holding the codebook whose bytes hash to `sha256`.

    >>> codebook_uri("s3://b/t.lance/", "ab12"), codebook_uri("/w/t", "ab12")
    ('s3://b/t.codebooks/ab12.npz', '/w/t.codebooks/ab12.npz')
    """
    return f"{beside(table_uri.rstrip('/'), CODEBOOKS_SUFFIX)}/{sha256}.npz"


def save_codebook(table_uri: str, codec: Codec,
                  storage_options: Mapping[str, str] | None = None) -> str:
    """Write the codec's bytes beside the table (once: the name is their digest) and
    return the digest the manifest records."""
    data = codec.to_bytes()
    sha = digest(data)
    fs, path = resolve(codebook_uri(table_uri, sha), storage_options)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if fs.get_file_info(path).size == len(data):
        return sha  # written before (a resume, or the same fit again)
    with fs.open_output_stream(path) as out:
        out.write(data)
    return sha


def load_codebook(table_uri: str, sha256: str,
                  storage_options: Mapping[str, str] | None = None) -> Codec:
    """The table's codec, checked against the digest its manifest recorded.

    Raises:
        ManifestMismatchError: the file is missing, or holds other bytes than the
            manifest names (another fit's codebook, or a damaged copy).
    """
    uri = codebook_uri(table_uri, sha256)
    fs, path = resolve(uri, storage_options)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except (FileNotFoundError, OSError) as err:
        raise ManifestMismatchError(
            f"{table_uri}: its first-stage codebook {uri} cannot be read ({err}); the "
            "table's code column cannot be searched or appended to without it") from None
    try:
        return Codec.from_bytes(data, sha256=sha256)
    except ValueError as err:
        raise ManifestMismatchError(f"{uri}: {err}") from None
