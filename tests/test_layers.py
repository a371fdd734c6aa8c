"""dyco_probe.layers: the one parser of layer choices and resolver of indices, and the order of windows."""

import pytest

from dyco_probe.interventions import Intervention, parse_layers
from dyco_probe.layers import parse_layer_choice, resolve_indices, window_order
from dyco_probe.tracing import TraceConfig


def test_parse_layer_choice():
    assert parse_layer_choice(None) is None and parse_layer_choice("") is None
    assert parse_layer_choice("last") is None and parse_layer_choice("none") is None
    assert parse_layer_choice("all") == "all"
    assert parse_layer_choice("0, 2,-1") == (0, 2, -1)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_layer_choice("0,x")


def test_resolve_indices_counts_negatives_from_the_end():
    assert resolve_indices([-1, 0, 3, 0], 4) == (0, 3)
    assert resolve_indices(-2, 4) == (2,)
    assert resolve_indices([], 4, allow_empty=True) == ()
    for bad in ([4], [-5], []):
        with pytest.raises(ValueError, match="out of range: the model has 4 layers"):
            resolve_indices(bad, 4)
    with pytest.raises(ValueError, match="heads \\[7\\] out of range: the model has 2 heads"):
        resolve_indices([7], 2, what="heads")


def test_every_layer_choice_resolves_the_same_way():
    assert TraceConfig(layers=(-1, 0)).resolve_layers(4) == (0, 3)
    assert Intervention.knockout("image", layers=[-1]).resolve_layers(4) == (3,)
    assert parse_layers([-1, 0], 4) == [(0, 3)]
    with pytest.raises(ValueError, match="out of range"):
        TraceConfig(layers=(9,)).resolve_layers(4)
    with pytest.raises(ValueError, match="out of range"):
        TraceConfig(heads=(9,)).resolve_heads(4)


def test_window_order():
    names = ["all", "3", "1-2", "10", "0", "x"]
    assert sorted(names, key=window_order) == ["0", "1-2", "3", "10", "x", "all"]
