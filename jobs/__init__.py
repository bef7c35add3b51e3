"""Orchestration: Ray Data pipelines, the `quiver` CLI and the Python API (`jobs.api`)."""
