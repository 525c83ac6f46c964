"""DGQ's kernels as torch custom ops (torch.library), so torch.compile and CUDA graphs see one op
per DGQ linear instead of Python and ctypes: `torch.ops.dgq.linear`."""

from .linear import linear, linear_python, load_native

__all__ = ["linear", "linear_python", "load_native"]
