"""DGQ's kernels as torch custom ops (torch.library), so torch.compile and CUDA graphs see one op
per DGQ linear (`torch.ops.dgq.linear`, `torch.ops.dgq.rotated_linear` behind an online input
rotation; `torch.ops.dgq.hadamard_rows` the rotation alone) instead of Python and ctypes."""

from .linear import linear, linear_python, load_native
from .rotation import hadamard_rows, rotated_linear

__all__ = ["hadamard_rows", "linear", "linear_python", "load_native", "rotated_linear"]
