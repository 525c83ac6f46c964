"""DGQ's kernels as torch custom ops (torch.library), so torch.compile and CUDA graphs see one op
per DGQ linear (`torch.ops.dgq.linear`, `torch.ops.dgq.rotated_linear` behind an online input
rotation; `torch.ops.dgq.hadamard_rows` the rotation alone; `torch.ops.dgq.norm_linear` with the
RMSNorm before it fused into its quantizer; `torch.ops.dgq.silu_mul_linear` with the gated MLP's
silu(gate) * up fused into it) instead of Python and ctypes."""

from .linear import linear, linear_python, load_native
from .norm import norm_linear, rms_norm
from .rotation import hadamard_rows, rotated_linear
from .silu_mul import silu_mul, silu_mul_linear

__all__ = ["hadamard_rows", "linear", "linear_python", "load_native", "norm_linear", "rms_norm", "rotated_linear", "silu_mul",
           "silu_mul_linear"]
