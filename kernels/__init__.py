"""Triton kernels for KDA and their torch.autograd wrappers (chunked forward and backward,
fused recurrent decode, DPLR). None has landed yet: until one does, the project's default
implementation is the chunkwise reference (equivalence.adapters.DEFAULT_IMPL)."""
