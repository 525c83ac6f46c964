"""dgqtool: W4A8 Dual Grained Quantization (DGQ, arXiv 2310.04836) for Hugging Face causal LMs."""

__version__ = "0.1.0"
