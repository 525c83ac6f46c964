"""`dgq cache`: where dgq's cache is, and removing it."""

from typing import Annotated

import typer

from .app import cache_app, command, reporter


@cache_app.command("info")
@command
def cache_info():
    """Where the cache is and how large each part is."""
    from ..fingerprints import cache_root

    root = cache_root()
    for part in ("gguf", "kernels", "digests.json"):
        path = root / part
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else (path.stat().st_size if path.is_file() else 0)
        typer.echo(f"{path}  {size / 2**20:.1f} MiB")


@cache_app.command("clear")
@command
def cache_clear(kernels: Annotated[bool, typer.Option("--kernels", help="Also remove the built kernel libraries.")] = False):
    """Remove the converted GGUF models and file digests (they are rebuilt on demand)."""
    import shutil

    from ..fingerprints import cache_root

    root = cache_root()
    for part in ("gguf", "digests.json") + (("kernels",) if kernels else ()):
        path = root / part
        if path.is_dir():
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()
    reporter().info(f"cleared {root}" + ("" if kernels else " (kernel libraries kept; --kernels removes them)"))


