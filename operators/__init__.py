"""Quiver's stages, each a plain function or callable class over Arrow data. No Ray here."""
