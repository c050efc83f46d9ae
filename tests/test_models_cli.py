"""``python -m effkern models`` without timm too: the methods of effkern.convert, their settings."""

from __future__ import annotations

from effkern.__main__ import main, models_text
from effkern.models.variants import METHODS


def test_models_text_lists_every_method_and_setting():
    text = models_text()
    for name in METHODS:
        assert f"\n{name}: " in text
    assert "r=0, prop_attn=True" in text and "keep_ratio=0.7, pruning_loc=(3, 6, 9)" in text
    assert "timm model names" in text  # the names, or why there are none


def test_models_command(capsys):
    assert main(["models"]) == 0
    assert "effkern.convert(model, method" in capsys.readouterr().out
