"""The package version, in one place (the OpenAPI document and ``pagedq.__version__`` read it)."""

__version__ = "0.1.0"
