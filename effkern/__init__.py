"""effkern: CUDA and Triton kernels for efficient Vision Transformers, as PyTorch ops."""

__version__ = "0.1.0"

from effkern._common import validation  # noqa: E402
from effkern._dispatch import BackendNotSupported, backend  # noqa: E402
from effkern import ops  # noqa: E402  (registers the torch.library ops)

__all__ = ["BackendNotSupported", "backend", "ops", "validation", "__version__"]
