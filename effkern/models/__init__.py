"""ViT variants assembled from effkern.nn, and effkern.convert for timm models.

Importing this package registers effkern's variants as timm model names when timm is installed
(:mod:`effkern.models.timm_names`: ``timm.create_model("deit_small_patch16_224_tome")``).
"""

from effkern.models.ivit import IViT
from effkern.models.variants import METHODS, DynamicViTLoss, IdleViTLoss, convert

try:
    import timm  # noqa: F401
except (ImportError, RuntimeError):  # optional; RuntimeError: a torchvision that does not fit this torch
    pass
else:
    from effkern.models import timm_names

    timm_names.register()

__all__ = ["METHODS", "DynamicViTLoss", "IViT", "IdleViTLoss", "convert"]
