"""ViT variants assembled from effkern.nn."""

from effkern.models.ivit import IViT

__all__ = ["IViT"]
