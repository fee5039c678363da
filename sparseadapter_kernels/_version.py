"""The library version (one place; setup reads pyproject.toml, which must agree: a test checks it)."""
__version__ = "0.1.0"
