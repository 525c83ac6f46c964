"""The `dgq` command line. app.py builds the app and its options from the recipe; each module here
holds one family of commands and registers them on import."""

from . import stages, evaluate, cache  # noqa: F401, I001  (registers the commands, in help order)
from .app import app, main

__all__ = ["app", "main"]
