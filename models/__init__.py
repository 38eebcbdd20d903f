"""Bundled reference models and their data."""
