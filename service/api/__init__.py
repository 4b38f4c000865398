"""The REST API, laid out as tiled's server: `build_app` (app.py), one router module per
resource (health, runs, results, images, events, dashboard), response models (schemas.py),
what routes share (dependencies.py) and the pages of row tables, from memory and Tiled (tables.py)."""
from .app import build_app

__all__ = ["build_app"]
