"""Triton kernels, one module per kernel family. Imported lazily by effkern.ops so that effkern
works where triton is not installed. On CPU tensors they run only under TRITON_INTERPRET=1."""
