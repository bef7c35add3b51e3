"""Quiver's contracts: job specs, table manifests and Arrow schemas. No I/O beyond parsing."""
