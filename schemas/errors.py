"""Errors Quiver knows how to explain to a user in one line.

The CLI maps each subclass to an exit code: spec and usage problems exit 2, runtime
failures exit 1. Built-in exceptions are never caught there, so bugs keep their tracebacks.
"""

from __future__ import annotations


class QuiverError(Exception):
    """Base of every error Quiver raises on purpose."""

    exit_code: int = 1


class SpecError(QuiverError):
    """A job spec or a command line that cannot be run as given (exit code 2)."""

    exit_code = 2


class SourceError(QuiverError):
    """A source that cannot be read at all (missing file, unknown format)."""

    exit_code = 2


class ModelError(QuiverError):
    """A model folder that cannot be found or loaded."""


class ManifestMismatchError(QuiverError):
    """A table was written with a different model or configuration than the caller's."""


class TableError(QuiverError):
    """A table that is missing, not a Quiver table, or in a state the job refuses."""


class QueryError(QuiverError):
    """A search the table cannot answer as asked (bad k, a mode it has no column for)."""

    exit_code = 2


class FilterError(QueryError):
    """A filter naming a column the table lacks, or a value its column cannot hold."""


class SchemaChangeError(TableError):
    """The source's metadata fields differ from the table's columns (refused before any
    work: a new or gone field without `write.on_schema_change: evolve`, or a new type)."""


class ConcurrentWriteError(TableError):
    """Another writer committed to the table while this job ran."""


class ClusterError(QuiverError):
    """The cluster cannot give the job what it asked for (GPUs within the wait)."""


class SourceChangedError(QuiverError):
    """A source file changed while the job ran (a runtime failure: run the job again)."""
