"""The REST API, laid out as tiled's server: `build_app` (app.py), one router module per
resource (health, runs, results, images, events, dashboard), response models (schemas.py) and
what routes share (dependencies.py)."""
from .app import build_app

__all__ = ["build_app"]
