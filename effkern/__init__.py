"""effkern: CUDA and Triton kernels for efficient Vision Transformers, as PyTorch ops."""

__version__ = "0.1.0"

from effkern._common import validation  # noqa: E402
from effkern._dispatch import BackendNotSupported, backend  # noqa: E402
from effkern import ops  # noqa: E402  (registers the torch.library ops)


def convert(model, method: str, **config):
    """Convert a timm VisionTransformer in place to run an efficient-ViT method (ToMe, EViT, ...);
    see :func:`effkern.models.variants.convert`."""
    from effkern.models.variants import convert as _convert

    return _convert(model, method, **config)


__all__ = ["BackendNotSupported", "backend", "convert", "ops", "validation", "__version__"]
