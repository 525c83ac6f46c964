"""dgqtool: W4A8 Dual Grained Quantization (DGQ, arXiv 2310.04836) for Hugging Face causal LMs."""

__version__ = "0.1.0"

from .integrations import install as _install_integrations  # noqa: E402  (after __version__: pack reads it)

_install_integrations()
