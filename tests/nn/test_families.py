"""The registry of layer families: built-in families, a user's family, and errors that name what is allowed."""

import pytest

from stablenet.nn import (
    AOLConv2d,
    AOLLinear,
    CayleyConv2d,
    CPLConv2d,
    LayerFamily,
    OrthogonalLinear,
    SLLConv2d,
    SLLLinear,
    families,
    layer_family,
    list_layer_families,
    register_layer_family,
)


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for the test, so that a test's families do not outlive it."""
    monkeypatch.setattr(families, "_FAMILIES", dict(families._FAMILIES))


def test_built_in_families():
    assert list_layer_families()[:6] == ["sll", "cpl", "aol", "sr", "cayley", "spectral"]
    sll = layer_family("sll")
    assert (sll.conv, sll.dense, sll.residual, sll.circular, sll.input_size) == (
        SLLConv2d,
        SLLLinear,
        True,
        False,
        False,
    )
    assert layer_family("cpl").conv is CPLConv2d and layer_family("cpl").input_size
    cayley = layer_family("cayley")
    assert (cayley.conv, cayley.dense, cayley.circular, cayley.residual) == (
        CayleyConv2d,
        OrthogonalLinear,
        True,
        False,
    )
    assert layer_family(cayley) is cayley


def test_a_users_family_is_registered_once(registry):
    family = register_layer_family("mine", conv=AOLConv2d, dense=AOLLinear)
    assert family == LayerFamily("mine", AOLConv2d, AOLLinear) and layer_family("mine") is family
    assert "mine" in list_layer_families()
    assert register_layer_family("mine", conv=AOLConv2d, dense=AOLLinear) == family  # the same again: no error
    with pytest.raises(ValueError, match="layer family 'mine' is already registered"):
        register_layer_family("mine", conv=AOLConv2d, dense=SLLLinear)


def test_errors_name_what_is_allowed(registry):
    with pytest.raises(ValueError, match=r"layer family must be one of 'sll', 'cpl', .*; got 'lot'"):
        layer_family("lot")
    with pytest.raises(ValueError, match="non-empty string name"):
        register_layer_family("", conv=AOLConv2d, dense=AOLLinear)
    with pytest.raises(ValueError, match="dense must be a layer class or callable; got int"):
        register_layer_family("bad", conv=AOLConv2d, dense=3)
    assert "bad" not in list_layer_families()
