"""The package version, in a leaf module so that any layer can report it without importing the
public API package (``ferry/__init__`` pulls the engine in lazily)."""

__version__ = "0.1.0"
