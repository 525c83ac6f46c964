"""Registration with other libraries, done when they are imported, not when dgqtool is: `import
dgqtool` stays cheap (the CLI's start-up), and transformers learns the `dgq` quantization method the
moment its quantizer table exists, whichever of the two is imported first."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TRANSFORMERS_TABLE = "transformers.quantizers.auto"


def _register_transformers() -> None:
    from .transformers import register

    register()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then` right after module `name` has executed (a one-shot post-import hook)."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute, then = spec.loader.exec_module, self.then

        def exec_module(module):
            execute(module)
            then()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if _TRANSFORMERS_TABLE in sys.modules:
        _register_transformers()
    elif importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _AfterImport(_TRANSFORMERS_TABLE, _register_transformers))
