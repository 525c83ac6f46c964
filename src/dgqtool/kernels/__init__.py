"""The W4A8 CUDA kernels: built from `kernels/` (CUTLASS-emitted GEMMs + hand-written CUDA) into a
shared library cached per GPU arch and source hash, and called through ctypes on torch tensors."""
