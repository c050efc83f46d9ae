"""effkern.nn.layers (timm's generic ViT layers, shared by every family and model): PatchEmbed
against a plain convolution, timm's state-dict keys, its input checks, the LayerNorm eps knob;
and the import direction of effkern.nn / effkern.models (models -> nn -> ops, no family module
importing another family's, nothing importing effkern.triton)."""

import ast
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effkern
from effkern.nn.layers import Attention, Block, PatchEmbed
from tests.conftest import DEVICE

PKG = Path(effkern.__file__).parent


# --------------------------------------------------------------------------------------------
# PatchEmbed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("img_size,patch_size", [(12, 4), ((15, 9), 3), ((8, 12), (4, 6))])
@pytest.mark.parametrize("flatten", [True, False])
def test_patch_embed_matches_conv(gen, img_size, patch_size, flatten):
    pe = PatchEmbed(img_size, patch_size, in_chans=3, embed_dim=10, flatten=flatten).to(torch.float64).to(DEVICE)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    x = torch.randn(3, 3, h, w, generator=gen, dtype=torch.float64).to(DEVICE)
    ref = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=(ph, pw))
    assert pe.grid_size == (h // ph, w // pw) and pe.num_patches == (h // ph) * (w // pw)
    out = pe(x)
    if flatten:
        ref = ref.flatten(2).transpose(1, 2)
        assert out.shape == (3, pe.num_patches, 10)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_patch_embed_state_dict_is_timms():
    assert set(PatchEmbed(16, 8, 3, 6).state_dict()) == {"proj.weight", "proj.bias"}
    assert set(PatchEmbed(16, 8, 3, 6, bias=False).state_dict()) == {"proj.weight"}
    normed = PatchEmbed(16, 8, 3, 6, norm_layer=nn.LayerNorm)
    assert set(normed.state_dict()) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(normed(x), F.layer_norm(normed.proj(x).flatten(2).transpose(1, 2), (6,),
                                                       normed.norm.weight, normed.norm.bias))


def test_patch_embed_refuses_bad_sizes():
    with pytest.raises(ValueError, match="img_size"):
        PatchEmbed(18, 4)  # 18 is not a multiple of 4
    pe = PatchEmbed(16, 4, 3, 8)
    with pytest.raises(ValueError, match="img_size"):
        pe(torch.randn(1, 3, 20, 16))
    with pytest.raises(ValueError, match="img_size"):
        pe(torch.randn(3, 16, 16))


# --------------------------------------------------------------------------------------------
# Block's LayerNorm eps (timm's VisionTransformer uses 1e-6, the Block class default 1e-5)
# --------------------------------------------------------------------------------------------


def test_block_norm_layer_sets_eps():
    assert Block(24, 3).norm1.eps == 1e-5  # nn.LayerNorm's, as the method repositories' Block
    blk = Block(24, 3, qk_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    assert {blk.norm1.eps, blk.norm2.eps, blk.attn.q_norm.eps, blk.attn.k_norm.eps} == {1e-6}
    assert isinstance(blk.attn, Attention)


# --------------------------------------------------------------------------------------------
# import direction
# --------------------------------------------------------------------------------------------


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every ``import m`` ((m, "")) and ``from m import name`` in path."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.module, a.name) for a in node.names]
    return out


NN_FAMILIES = sorted(p.stem for p in (PKG / "nn").glob("*.py") if p.stem not in ("__init__", "layers"))


def test_layers_depend_on_torch_only():
    assert not [m for m, _ in _imports(PKG / "nn" / "layers.py") if m.startswith("effkern")]


@pytest.mark.parametrize("family", NN_FAMILIES)
def test_nn_family_imports_point_down(family):
    """A family's nn module uses layers and ops (its own family's module or the public ops), never
    another family's nn or ops module, effkern.triton, or another module's private name."""
    bad = []
    for mod, name in _imports(PKG / "nn" / f"{family}.py"):
        if not mod.startswith("effkern"):
            continue
        ok = mod in ("effkern.nn.layers", "effkern.ops", f"effkern.ops.{family}")
        if not ok or name.startswith("_"):
            bad.append(f"{mod}:{name}")
    assert not bad, f"effkern/nn/{family}.py imports {bad}"


@pytest.mark.parametrize("path", sorted((PKG / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_import_only_nn(path):
    bad = [f"{m}:{n}" for m, n in _imports(path)
           if m.startswith("effkern") and (not m.startswith(("effkern.nn", "effkern.models")) or n.startswith("_"))]
    assert not bad, f"effkern/models/{path.name} imports {bad}"
