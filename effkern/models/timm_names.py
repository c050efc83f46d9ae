"""effkern's ViT (and PVTv2) variants as timm model names: ``timm.create_model("<arch>_<method>", ...)``.

    import effkern.models  # registers the names (when timm is installed)
    model = timm.create_model("deit_small_patch16_224_tome", pretrained=True, r=16)

Naming: ``<timm arch>_<method>``, e.g. ``deit_small_patch16_224_evit``. Not
``<arch>.<method>``: timm reads the part after a dot as a pretrained-weights tag
(``vit_base_patch16_224.augreg_in21k``), so such a name would ask timm for weights named after
the method. The factory builds timm's own model for the arch (``pretrained`` and every timm
keyword pass through, so the arch's default pretrained weights load as usual), then
:func:`effkern.convert` with the method's keywords (``ivit``: presets for DeiT-T/S/B only, the
archs I-ViT reports; the result is an integer-only :class:`~effkern.models.IViT`) (the method's settings as in
``effkern.models.variants.METHODS``; ``strict=False`` where the method can add parameters).
PVTv2 (``pvt_v2_b0`` / ``b1`` / ``b2``) has the names of the methods that convert it
(``pvt_v2_b0_shiftadd``, ``pvt_v2_b0_shift``, ...). ``timm.list_models("*_tome")`` finds them;
``python -m effkern models`` lists them.
"""

from __future__ import annotations

import functools
import inspect

from effkern.models.variants import METHODS, convert

# The timm archs whose blocks convert() supports (pre-norm Block; DeiT-III has LayerScale).
ARCHS = (
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
    "deit3_small_patch16_224", "deit3_base_patch16_224",
    "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
)
# timm's PVTv2 archs, for the methods that convert a PVTv2 (METHODS[method].pvt: shiftadd, shift)
PVT_ARCHS = ("pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2")


def _archs(method: str) -> tuple[str, ...]:
    m = METHODS[method]
    return (m.archs or ARCHS) + (PVT_ARCHS if m.pvt else ())


def names() -> list[str]:
    """Every registered name, ``<arch>_<method>``."""
    return [f"{arch}_{method}" for method in METHODS for arch in _archs(method)]


def _method_keywords(method: str) -> set[str]:
    params = inspect.signature(METHODS[method].configure).parameters
    return {p for p in params if p != "model"}


def _factory(arch: str, method: str):
    def create(pretrained: bool = False, **kwargs):
        import timm

        cfg = {k: kwargs.pop(k) for k in list(kwargs) if k in _method_keywords(method)}
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
        # the name asks for the method: the parameters it adds (DynamicViT's predictors, ShiftAddViT's
        # dwconv, DeepShift-PS's shift and sign) are expected
        m = METHODS[method]
        return convert(model, method, strict=m.add_modules is None and m.replace_modules is None, **cfg)

    create.__name__ = create.__qualname__ = f"{arch}_{method}"
    create.__module__ = __name__
    create.__doc__ = f"timm's {arch} converted by effkern.convert(model, {method!r}, ...): {METHODS[method].doc}"
    return create


@functools.lru_cache(maxsize=None)
def register() -> list[str]:
    """Register every name with timm (once); returns them. ImportError without timm."""
    from timm.models import register_model

    for method in METHODS:
        for arch in _archs(method):
            fn = _factory(arch, method)
            globals()[fn.__name__] = fn  # timm records the entry point's module attribute
            register_model(fn)
    return names()
