"""``validate=None``, the default of every op that checks input values on the host: validated on
CPU tensors (free), never on the GPU hot path unless asked for (``effkern.validation()``,
``EFFKERN_VALIDATE``), because the check is a device synchronisation there."""

import contextlib

import pytest
import torch

import effkern
from effkern._common import validation_enabled
from effkern.ops import binary_hash as bh
from effkern.ops import bipartite_matching, fuse_tokens, merge_tokens, token_gather, token_scatter

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_default_is_on_for_cpu_off_for_gpu(monkeypatch):
    monkeypatch.delenv("EFFKERN_VALIDATE", raising=False)
    assert validation_enabled(CPU) and not validation_enabled(CUDA)


@pytest.mark.parametrize("value, expected", [("1", True), ("on", True), ("0", False), ("false", False)])
def test_environment_variable(monkeypatch, value, expected):
    monkeypatch.setenv("EFFKERN_VALIDATE", value)
    assert validation_enabled(CPU) is expected and validation_enabled(CUDA) is expected


def test_bad_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("EFFKERN_VALIDATE", "maybe")
    with pytest.raises(ValueError, match="EFFKERN_VALIDATE"):
        validation_enabled(CUDA)


def test_context_manager_wins_and_nests(monkeypatch):
    monkeypatch.setenv("EFFKERN_VALIDATE", "0")
    with effkern.validation():
        assert validation_enabled(CUDA)
        with effkern.validation(False):
            assert not validation_enabled(CPU)
        assert validation_enabled(CPU)
    assert not validation_enabled(CPU)


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every way a value check reads device data back to the host raises inside the block."""
    def refuse(*_, **__):
        raise AssertionError("a host read (device sync on a GPU) on the hot path")
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
            m.setattr(torch.Tensor, name, refuse)
        yield


def _token_calls(gen):
    x = torch.randn(2, 9, 4, generator=gen)
    idx = torch.stack([torch.randperm(9, generator=gen)[:5] for _ in range(2)])
    w = torch.rand(2, 9, generator=gen)
    plan = bipartite_matching(torch.randn(2, 9, 4, generator=gen), 3)
    return {
        "token_gather": lambda: token_gather(x, idx),
        "token_scatter": lambda: token_scatter(x, x[:, :5], idx),
        "fuse_tokens": lambda: fuse_tokens(x, w, idx),
        "bipartite_matching": lambda: bipartite_matching(x, 3),
        "merge_tokens": lambda: merge_tokens(plan, x),
    }


def _binary_hash_calls(gen):
    b, h, n, d, m, nbits = 2, 3, 7, 8, 5, 12
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    ksh = bh.KSHParams(torch.randn(h, m, d, generator=gen), torch.randn(h, m, generator=gen),
                       torch.randn(h, nbits, m, generator=gen))
    codes = bh.pack_bits(torch.randn(b, h, n, nbits, generator=gen))
    return {
        "ksh_hash": lambda: ksh(q),
        "binary_attention": lambda: bh.binary_attention(codes, codes, v, nbits=nbits, form="ecoformer"),
        "binary_hash_attention": lambda: bh.binary_hash_attention(q, k, v, ksh, "shiftadd"),
    }


def _calls(gen):
    return {**_token_calls(gen), **_binary_hash_calls(gen)}


@pytest.mark.parametrize("op", ["token_gather", "token_scatter", "fuse_tokens", "bipartite_matching", "merge_tokens",
                                "ksh_hash", "binary_attention", "binary_hash_attention"])
def test_validation_off_means_no_host_read(monkeypatch, gen, op):
    call = _calls(gen)[op]
    call()  # validated on CPU by default
    with effkern.validation(False), no_host_reads(monkeypatch):
        call()
    with effkern.validation(True), no_host_reads(monkeypatch), pytest.raises(AssertionError, match="host read"):
        call()  # the probe sees the validation's read: it can fail


def test_default_still_raises_on_cpu():
    x = torch.randn(2, 5, 3)
    with pytest.raises(IndexError, match="idx must lie in"):
        token_gather(x, torch.tensor([[0, 7], [1, 2]]))
    assert token_gather(x, torch.tensor([[0, 7], [1, 2]]), validate=False)[0, 1].abs().sum() == 0
