"""scatterflow service: ingest, dispatch, publishing, API and CLI (all I/O)."""
__version__ = "0.1.0"
