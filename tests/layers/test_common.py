"""Plumbing layers (resnetc/layers/common.py) against real Caffe (oracle probes), plus the Caffe rules the
probes do not reach (read from BVLC ``src/caffe/layers/*.cpp``): legacy concat_dim/slice_dim, Reshape's
negative axis, Flatten's empty range, ArgMax ties, Eltwise MAX tie gradients, Filter, BatchReindex, Parameter,
DummyData, Silence, HDF5Output and the shape errors.

``replay_probe`` is shared with test_neuron.py.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

import resnetc
from resnetc.errors import ResnetcError
from resnetc.graph import build_graph
from resnetc.prototxt import read_net

from conftest import ORACLE

PROBES = os.path.join(ORACLE, "probes")
FWD_TOL = 1e-5  # |got - caffe| / (|caffe| + 1e-3)
GRAD_TOL = 1e-4


def probes_for(*prefixes) -> list:
    """Probe names (npz present) starting with one of ``prefixes``; empty when ../shared is absent."""
    names = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(PROBES, "*.npz")))
    return [n for n in names if n.startswith(prefixes)]


def _err(got, exp) -> float:
    got, exp = np.asarray(got, np.float64), np.asarray(exp, np.float64)
    return float(np.max(np.abs(got - exp) / (np.abs(exp) + 1e-3))) if exp.size else 0.0


def replay_probe(name: str) -> None:
    """Load probe ``name`` with resnetc, set Caffe's params, run forward (and backward with Caffe's top diffs);
    every blob, parameter after forward, input gradient and parameter gradient must match Caffe."""
    d = np.load(os.path.join(PROBES, name + ".npz"), allow_pickle=False)
    phase = str(d["phase"]) if "phase" in d.files else "TEST"
    net = resnetc.load_net(os.path.join(PROBES, name + ".prototxt"), phase=phase)
    with torch.no_grad():
        for k in d.files:
            if k.startswith("param/"):
                _, layer, i = k.split("/")
                p = net.params[layer][int(i)]
                p.copy_(torch.from_numpy(d[k]).reshape(p.shape))
    for k in d.files:  # Caffe's default init where the probe set nothing (e.g. PReLU's 0.25)
        if k.startswith("param_default_init/"):
            _, layer, i = k.split("/")
            got = net.params[layer][int(i)].detach().numpy()
            assert got.shape == d[k].shape, f"{name}: {layer}[{i}] shape {got.shape} != caffe {d[k].shape}"
            assert _err(got, d[k]) <= FWD_TOL, f"{name}: default init of {layer}[{i}] differs from Caffe's"
    inputs = {k[3:]: torch.from_numpy(d[k]).requires_grad_(d[k].dtype.kind == "f")
              for k in d.files if k.startswith("in/")}
    outs = net(**inputs)
    for k in d.files:
        if k.startswith("out/"):
            blob = k[4:]
            got = (outs[blob] if blob in outs else net.blobs[blob]).detach().numpy()
            assert got.shape == d[k].shape, f"{name}: blob {blob} shape {got.shape} != caffe {d[k].shape}"
            e = _err(got, d[k])
            assert e <= FWD_TOL, f"{name}: blob {blob} relative error {e:.2e}"
        if k.startswith("param_after/"):
            _, layer, i = k.split("/")
            got = net.params[layer][int(i)].detach().numpy()
            assert got.shape == d[k].shape, f"{name}: {layer}[{i}] shape {got.shape} != caffe {d[k].shape}"
            assert _err(got, d[k]) <= FWD_TOL, f"{name}: {layer}[{i}] after forward differs"
    tops = [k[9:] for k in d.files if k.startswith("top_diff/")]
    if not tops:
        return
    ys = [outs[t] if t in outs else net.blobs[t] for t in tops]
    torch.autograd.backward(ys, [torch.from_numpy(d["top_diff/" + t]).reshape(y.shape) for t, y in zip(tops, ys)])
    checked = 0
    for k in d.files:
        if k.startswith("in_diff/"):
            g = inputs[k[8:]].grad
            got = np.zeros_like(d[k]) if g is None else g.numpy()  # no autograd path = Caffe's zero diff
            e = _err(got, d[k])
            assert e <= GRAD_TOL, f"{name}: gradient of input {k[8:]} relative error {e:.2e}"
            checked += 1
        if k.startswith("param_diff/"):
            _, layer, i = k.split("/")
            g = net.params[layer][int(i)].grad
            assert g is not None, f"{name}: no gradient for {layer}[{i}]"
            e = _err(g.numpy(), d[k])
            assert e <= GRAD_TOL, f"{name}: gradient of {layer}[{i}] relative error {e:.2e}"
            checked += 1
    assert checked, f"{name}: the probe has top diffs but no gradient was compared"


COMMON_PROBES = probes_for("concat", "slice", "split", "eltwise", "flatten", "reshape", "crop", "tile",
                           "reduction", "argmax", "embed", "softmax_axis")


def test_probes_found(oracle):
    assert len(COMMON_PROBES) >= 30, COMMON_PROBES


@pytest.mark.parametrize("name", COMMON_PROBES)
def test_probe(name, oracle):
    replay_probe(name)


# ----------------------------------------------------------------------------------------------------------
# helpers for hand-made nets


def net_from(text: str, tmp_path, phase="TEST", name="t.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return resnetc.load_net(str(path), phase=phase)


def graph_from(text: str, tmp_path, phase="TEST"):
    path = tmp_path / "g.prototxt"
    path.write_text(text)
    return build_graph(read_net(str(path)), phase)


def inp(name, *dims):
    d = " ".join(f"dim: {x}" for x in dims)
    return f'layer {{ name: "in_{name}" type: "Input" top: "{name}" input_param {{ shape {{ {d} }} }} }}\n'


def top_shape(text, tmp_path, blob="y"):
    g = graph_from(text, tmp_path)
    return g.shape(blob)


def shape_error(text, tmp_path, match):
    with pytest.raises(ResnetcError, match=match) as ei:
        graph_from(text, tmp_path)
    assert "g.prototxt:" in str(ei.value), str(ei.value)  # names file and line


# ----------------------------------------------------------------------------------------------------------
# Input


def test_input_shapes_once_or_per_top(tmp_path):
    one = 'layer { name: "i" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } } }'
    g = graph_from(one, tmp_path)
    assert g.shape("a") == (2, 3) and g.shape("b") == (2, 3)
    per = ('layer { name: "i" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 } '
           'shape { dim: 4 dim: 1 } } }')
    g = graph_from(per, tmp_path)
    assert g.shape("a") == (2,) and g.shape("b") == (4, 1)
    none = 'layer { name: "i" type: "Input" top: "a" }'
    assert graph_from(none, tmp_path).shape("a") is None
    bad = ('layer { name: "i" type: "Input" top: "a" top: "b" top: "c" input_param { shape { dim: 2 } '
           'shape { dim: 4 } } }')
    shape_error(bad, tmp_path, "0 shapes, 1 shape")


# ----------------------------------------------------------------------------------------------------------
# Concat / Slice / Split


def test_concat_legacy_concat_dim_and_errors(tmp_path):
    base = inp("a", 2, 3, 4) + inp("b", 2, 3, 5)
    assert top_shape(base + 'layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y" '
                     'concat_param { concat_dim: 2 } }', tmp_path) == (2, 3, 9)
    assert top_shape(base + 'layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y" '
                     'concat_param { axis: -1 } }', tmp_path) == (2, 3, 9)
    shape_error(base + 'layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y" '
                'concat_param { axis: 2 concat_dim: 2 } }', tmp_path, "not both")
    shape_error(base + 'layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y" }', tmp_path,
                "same shape except")


def test_concat_single_bottom_aliases(tmp_path):
    net = net_from(inp("a", 2, 3) + 'layer { name: "c" type: "Concat" bottom: "a" top: "y" }', tmp_path)
    a = torch.randn(2, 3)
    assert net(a=a)["y"] is a


def test_slice_legacy_slice_dim_points_and_errors(tmp_path):
    net = net_from(inp("x", 2, 7) + 'layer { name: "s" type: "Slice" bottom: "x" top: "p" top: "q" top: "r" '
                   'slice_param { slice_dim: 1 slice_point: 1 slice_point: 4 } }', tmp_path)
    x = torch.arange(14.0).reshape(2, 7)
    out = net(x=x)
    assert [tuple(out[k].shape) for k in "pqr"] == [(2, 1), (2, 3), (2, 3)]
    assert torch.equal(torch.cat([out["p"], out["q"], out["r"]], 1), x)
    two = inp("x", 2, 7) + 'layer { name: "s" type: "Slice" bottom: "x" top: "p" top: "q" '
    shape_error(two + '}', tmp_path, "cannot be split equally")
    shape_error(two + 'slice_param { slice_point: 3 slice_point: 5 } }', tmp_path, "exactly 1 value")
    shape_error(two + 'slice_param { slice_point: 0 } }', tmp_path, "strictly increasing")
    shape_error(two + 'slice_param { slice_point: 8 } }', tmp_path, "beyond")


def test_split_refuses_in_place_and_sums_gradients(tmp_path):
    shape_error(inp("x", 2) + 'layer { name: "s" type: "Split" bottom: "x" top: "x" }', tmp_path, "in place")
    net = net_from(inp("x", 3) + 'layer { name: "s" type: "Split" bottom: "x" top: "a" top: "b" }', tmp_path)
    x = torch.randn(3, requires_grad=True)
    out = net(x=x)
    (out["a"] * 2 + out["b"] * 3).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), 5.0))


# ----------------------------------------------------------------------------------------------------------
# Eltwise


def _eltwise(tmp_path, op, n=3, extra=""):
    text = "".join(inp(c, 4) for c in "abc"[:n])
    bottoms = " ".join(f'bottom: "{c}"' for c in "abc"[:n])
    return net_from(text + f'layer {{ name: "e" type: "Eltwise" {bottoms} top: "y" '
                    f'eltwise_param {{ operation: {op} {extra} }} }}', tmp_path)


def test_eltwise_max_tie_rules(tmp_path):
    """Caffe: bottom 1 wins a tie with bottom 0; a later bottom must be strictly greater to win."""
    net = _eltwise(tmp_path, "MAX")
    a = torch.tensor([1.0, 2.0, 5.0, 3.0], requires_grad=True)
    b = torch.tensor([1.0, 2.0, 4.0, 1.0], requires_grad=True)
    c = torch.tensor([1.0, 1.0, 5.0, 3.0], requires_grad=True)
    y = net(a=a, b=b, c=c)["y"]
    assert y.tolist() == [1.0, 2.0, 5.0, 3.0]
    y.backward(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    assert a.grad.tolist() == [0, 0, 30, 40]  # a strictly greater than b; c only ties
    assert b.grad.tolist() == [10, 20, 0, 0]  # a == b: b wins; c == top: not strictly greater
    assert c.grad.tolist() == [0, 0, 0, 0]


def test_eltwise_sum_coeffs_and_errors(tmp_path):
    net = _eltwise(tmp_path, "SUM", extra="coeff: 1 coeff: -2 coeff: 0.5")
    a, b, c = (torch.randn(4, requires_grad=True) for _ in range(3))
    y = net(a=a, b=b, c=c)["y"]
    assert torch.allclose(y, a - 2 * b + 0.5 * c)
    y.sum().backward()
    assert b.grad.tolist() == [-2.0] * 4 and c.grad.tolist() == [0.5] * 4
    bad = "".join(inp(c, 4) for c in "ab")
    shape_error(bad + 'layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "y" '
                'eltwise_param { operation: PROD coeff: 1 coeff: 2 } }', tmp_path, "only allowed with operation SUM")
    shape_error(bad + 'layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "y" '
                'eltwise_param { coeff: 1 } }', tmp_path, "one coeff per bottom")
    shape_error(inp("a", 4) + inp("b", 2, 2) + 'layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" '
                'top: "y" }', tmp_path, "same shape")


def test_eltwise_prod_unstable_gradient_is_y_over_x(tmp_path):
    net = _eltwise(tmp_path, "PROD", n=2, extra="stable_prod_grad: false")
    a = torch.tensor([2.0, 0.0, -3.0, 1.5], requires_grad=True)
    b = torch.tensor([5.0, 4.0, 2.0, 0.5], requires_grad=True)
    y = net(a=a, b=b)["y"]
    y.sum().backward()
    assert a.grad[0] == 5.0 and a.grad[2] == 2.0
    assert torch.isnan(a.grad[1])  # Caffe divides y by x_i: 0/0
    assert b.grad.tolist() == [2.0, 0.0, -3.0, 1.5]


# ----------------------------------------------------------------------------------------------------------
# Flatten / Reshape


def test_flatten_axes(tmp_path):
    x = inp("x", 2, 3, 4, 5)
    fl = 'layer { name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param { %s } }'
    assert top_shape(x + fl % "", tmp_path) == (2, 60)
    assert top_shape(x + fl % "axis: 1 end_axis: 2", tmp_path) == (2, 12, 5)
    assert top_shape(x + fl % "axis: -2", tmp_path) == (2, 3, 20)
    assert top_shape(x + fl % "axis: 2 end_axis: 1", tmp_path) == (2, 3, 1, 4, 5)  # empty range: a 1 axis
    shape_error(x + fl % "axis: 3 end_axis: 1", tmp_path, "before axis")
    shape_error(inp("x", 2) + 'layer { name: "f" type: "Flatten" bottom: "x" top: "x" }', tmp_path, "in place")
    net = net_from(x + fl % "axis: 2 end_axis: 1", tmp_path)
    assert net(x=torch.zeros(2, 3, 4, 5))["y"].shape == (2, 3, 1, 4, 5)


def test_reshape_rules(tmp_path):
    x = inp("x", 2, 3, 4)
    rs = 'layer { name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param { shape { %s } %s } }'
    assert top_shape(x + rs % ("dim: 0 dim: -1", ""), tmp_path) == (2, 12)
    assert top_shape(x + rs % ("dim: 1", "axis: -1"), tmp_path) == (2, 3, 4, 1)  # -1: after the last axis
    assert top_shape(x + rs % ("dim: 1", "axis: 0 num_axes: 0"), tmp_path) == (1, 2, 3, 4)
    assert top_shape(x + rs % ("dim: 2 dim: 2", "axis: -2"), tmp_path) == (2, 3, 2, 2)
    assert top_shape(x + rs % ("dim: -1", "axis: 1 num_axes: -1"), tmp_path) == (2, 12)
    shape_error(x + rs % ("dim: -1 dim: -1", ""), tmp_path, "more than one -1")
    shape_error(x + rs % ("dim: 5 dim: -1", ""), tmp_path, "not divisible")
    shape_error(x + rs % ("dim: 5", ""), tmp_path, "changes the number of elements")
    shape_error(x + rs % ("dim: 0 dim: 0 dim: 0 dim: 0", ""), tmp_path, "no axis 3 to copy")
    shape_error(x + rs % ("dim: 1", "axis: 1 num_axes: 3"), tmp_path, "beyond")


def test_reshape_copies_batch_at_run_time(tmp_path):
    net = net_from(inp("x", 2, 3, 4) + 'layer { name: "r" type: "Reshape" bottom: "x" top: "y" '
                   'reshape_param { shape { dim: 0 dim: -1 } } }', tmp_path)
    assert net(x=torch.zeros(5, 3, 4))["y"].shape == (5, 12)


# ----------------------------------------------------------------------------------------------------------
# Crop / Tile / Reduction


def test_crop_offsets_and_errors(tmp_path):
    base = inp("a", 2, 3, 8, 9) + inp("b", 1, 1, 4, 5)
    cr = 'layer { name: "c" type: "Crop" bottom: "a" bottom: "b" top: "y" crop_param { %s } }'
    net = net_from(base + cr % "axis: 2 offset: 1 offset: 3", tmp_path)
    a = torch.randn(2, 3, 8, 9, requires_grad=True)
    y = net(a=a, b=torch.zeros(1, 1, 4, 5))["y"]
    assert torch.equal(y, a[:, :, 1:5, 3:8])
    y.sum().backward()
    assert a.grad.sum() == 2 * 3 * 4 * 5 and a.grad[:, :, 0].sum() == 0
    assert top_shape(base + cr % "axis: 1 offset: 0", tmp_path) == (2, 1, 4, 5)
    shape_error(base + cr % "axis: 1 offset: 0 offset: 1", tmp_path, "one per cropped axis")
    shape_error(base + cr % "offset: 5", tmp_path, "out of bounds")


def test_tile_repeats_whole_block(tmp_path):
    net = net_from(inp("x", 2, 2) + 'layer { name: "t" type: "Tile" bottom: "x" top: "y" '
                   'tile_param { axis: 0 tiles: 2 } }', tmp_path)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert net(x=x)["y"].tolist() == [[1, 2], [3, 4], [1, 2], [3, 4]]
    shape_error(inp("x", 2) + 'layer { name: "t" type: "Tile" bottom: "x" top: "y" tile_param { tiles: 0 } }',
                tmp_path, "positive")


def test_reduction_default_is_scalar(tmp_path):
    net = net_from(inp("x", 2, 3) + 'layer { name: "r" type: "Reduction" bottom: "x" top: "y" '
                   'reduction_param { operation: MEAN coeff: 3 } }', tmp_path)
    x = torch.arange(6.0)
    y = net(x=x.reshape(2, 3))["y"]
    assert y.shape == () and float(y) == pytest.approx(7.5)
    y = net(x=torch.arange(12.0).reshape(4, 3))["y"]  # another batch: Caffe re-derives coeff/dim each forward
    assert float(y) == pytest.approx(16.5)


def test_slice_of_the_batch_axis_follows_the_batch(tmp_path):
    net = net_from(inp("x", 4, 2) + 'layer { name: "s" type: "Slice" bottom: "x" top: "p" top: "q" '
                   'slice_param { axis: 0 } }', tmp_path)
    out = net(x=torch.zeros(6, 2))
    assert out["p"].shape == (3, 2) and out["q"].shape == (3, 2)
    net = net_from(inp("x", 4, 2) + 'layer { name: "s" type: "Slice" bottom: "x" top: "p" top: "q" '
                   'slice_param { axis: 0 slice_point: 1 } }', tmp_path)
    out = net(x=torch.zeros(6, 2))
    assert out["p"].shape == (1, 2) and out["q"].shape == (5, 2)


# ----------------------------------------------------------------------------------------------------------
# ArgMax / Embed / Softmax


def test_argmax_ties_prefer_the_higher_index(tmp_path):
    """Caffe sorts (value, index) pairs with std::greater: equal values order by descending index."""
    net = net_from(inp("x", 2, 4) + 'layer { name: "a" type: "ArgMax" bottom: "x" top: "y" '
                   'argmax_param { top_k: 3 out_max_val: true } }', tmp_path)
    x = torch.tensor([[1.0, 5.0, 5.0, 2.0], [7.0, 7.0, 7.0, 7.0]])
    y = net(x=x)["y"]
    assert y.shape == (2, 2, 3)
    assert y[0].tolist() == [[2, 1, 3], [5, 5, 2]]
    assert y[1].tolist() == [[3, 2, 1], [7, 7, 7]]
    net = net_from(inp("x", 1, 3, 2) + 'layer { name: "a" type: "ArgMax" bottom: "x" top: "y" '
                   'argmax_param { axis: 1 } }', tmp_path)
    y = net(x=torch.tensor([[[1.0, 4.0], [3.0, 4.0], [3.0, 0.0]]]))["y"]
    assert y.tolist() == [[[2.0, 1.0]]]


def test_argmax_shapes(tmp_path):
    am = 'layer { name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { %s } }'
    assert top_shape(inp("x", 2, 3, 4, 5) + am % "top_k: 2", tmp_path) == (2, 1, 2, 1)
    assert top_shape(inp("x", 2, 3) + am % "out_max_val: true", tmp_path) == (2, 2, 1)
    assert top_shape(inp("x", 2, 3, 4) + am % "axis: -1 top_k: 3", tmp_path) == (2, 3, 3)
    shape_error(inp("x", 2, 3) + am % "axis: 1 top_k: 4", tmp_path, "top_k 4 is larger")


def test_embed_truncates_and_checks_range(tmp_path):
    net = net_from(inp("x", 4) + 'layer { name: "e" type: "Embed" bottom: "x" top: "y" '
                   'embed_param { num_output: 2 input_dim: 3 } }', tmp_path)
    assert [tuple(p.shape) for p in net.params["e"]] == [(3, 2), (2,)]
    with torch.no_grad():
        net.params["e"][0].copy_(torch.tensor([[0.0, 1.0], [10.0, 11.0], [20.0, 21.0]]))
        net.params["e"][1].copy_(torch.tensor([0.5, -0.5]))
    y = net(x=torch.tensor([0.9, 1.99, -0.5, 2.0]))["y"]
    assert y.tolist() == [[0.5, 0.5], [10.5, 10.5], [0.5, 0.5], [20.5, 20.5]]
    with pytest.raises(ResnetcError, match="out of range for input_dim 3"):
        net(x=torch.tensor([0.0, 3.0, 1.0, 1.0]))
    shape_error(inp("x", 4) + 'layer { name: "e" type: "Embed" bottom: "x" top: "y" '
                'embed_param { num_output: 2 } }', tmp_path, "input_dim must be positive")


def test_softmax_axis_error(tmp_path):
    shape_error(inp("x", 2, 3) + 'layer { name: "s" type: "Softmax" bottom: "x" top: "y" '
                'softmax_param { axis: 2 } }', tmp_path, "out of range")


# ----------------------------------------------------------------------------------------------------------
# Filter / BatchReindex / Parameter / DummyData / Silence / HDF5Output


def test_filter_keeps_selected_rows(tmp_path):
    text = inp("a", 4, 2) + inp("s", 4, 1) + ('layer { name: "f" type: "Filter" bottom: "a" bottom: "s" '
                                               'top: "y" }')
    assert graph_from(text, tmp_path).shape("y") == (4, 2)  # Caffe's setup shape: the full batch
    net = net_from(text, tmp_path)
    a = torch.arange(8.0).reshape(4, 2).requires_grad_(True)
    y = net(a=a, s=torch.tensor([[0.0], [1.0], [0.0], [-2.0]]))["y"]
    assert y.tolist() == [[2, 3], [6, 7]]
    y.sum().backward()
    assert a.grad.tolist() == [[0, 0], [1, 1], [0, 0], [1, 1]]
    shape_error(inp("a", 4, 2) + inp("s", 4, 2) + 'layer { name: "f" type: "Filter" bottom: "a" bottom: "s" '
                'top: "y" }', tmp_path, "must be 1 on every axis")
    shape_error(inp("a", 4, 2) + inp("s", 4, 1) + 'layer { name: "f" type: "Filter" bottom: "a" bottom: "s" '
                'top: "y" top: "z" }', tmp_path, "one top per filtered bottom")


def test_batch_reindex(tmp_path):
    text = inp("a", 3, 2) + inp("i", 4) + 'layer { name: "r" type: "BatchReindex" bottom: "a" bottom: "i" top: "y" }'
    assert graph_from(text, tmp_path).shape("y") == (4, 2)
    net = net_from(text, tmp_path)
    a = torch.arange(6.0).reshape(3, 2).requires_grad_(True)
    y = net(a=a, i=torch.tensor([2.0, 0.0, 2.0, 1.0]))["y"]
    assert y.tolist() == [[4, 5], [0, 1], [4, 5], [2, 3]]
    y.sum().backward()
    assert a.grad.tolist() == [[1, 1], [1, 1], [2, 2]]
    with pytest.raises(ResnetcError, match="out of range"):
        net(a=a, i=torch.tensor([3.0, 0.0, 0.0, 0.0]))


def test_parameter_layer_top_is_its_blob(tmp_path):
    net = net_from('layer { name: "p" type: "Parameter" top: "y" parameter_param { shape { dim: 2 dim: 3 } } }',
                   tmp_path)
    p = net.params["p"][0]
    assert p.shape == (2, 3) and float(p.detach().abs().sum()) == 0.0
    y = net()["y"]
    (y * 2).sum().backward()
    assert p.grad.tolist() == [[2.0] * 3] * 2


def test_dummy_data_fillers_and_shapes(tmp_path):
    text = ('layer { name: "d" type: "DummyData" top: "a" top: "b" top: "c" dummy_data_param { '
            'data_filler { type: "constant" value: 3 } data_filler { type: "uniform" min: 2 max: 4 } '
            'data_filler { type: "gaussian" std: 2 } num: 5 num: 6 num: 7 channels: 2 height: 1 width: 3 } }')
    g = graph_from(text, tmp_path)
    assert [g.shape(b) for b in "abc"] == [(5, 2, 1, 3), (6, 2, 1, 3), (7, 2, 1, 3)]
    net = net_from(text, tmp_path)
    torch.manual_seed(0)
    out = net()
    assert torch.equal(out["a"], torch.full((5, 2, 1, 3), 3.0))
    assert out["b"].min() >= 2 and out["b"].max() <= 4
    again = net()
    assert not torch.equal(again["b"], out["b"])  # non-constant fillers refill every forward
    zero = net_from('layer { name: "d" type: "DummyData" top: "a" dummy_data_param { shape { dim: 4 } } }',
                    tmp_path)
    assert zero()["a"].tolist() == [0.0] * 4
    shape_error('layer { name: "d" type: "DummyData" top: "a" dummy_data_param { shape { dim: 4 } num: 2 '
                'channels: 1 height: 1 width: 1 } }', tmp_path, "not both")
    shape_error('layer { name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { shape { dim: 4 } '
                'data_filler { } data_filler { } data_filler { } } }', tmp_path, "0, 1 or one data_filler")


def test_silence_consumes_bottoms(tmp_path):
    net = net_from(inp("x", 2) + 'layer { name: "s" type: "Silence" bottom: "x" }', tmp_path)
    assert net(x=torch.zeros(2)) == {}


def test_hdf5_output_writes_one_batch(tmp_path):
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "out.h5"
    net = net_from(inp("d", 2, 3) + inp("l", 2) + 'layer { name: "h" type: "HDF5Output" bottom: "d" bottom: "l" '
                   f'hdf5_output_param {{ file_name: "{out}" }} }}', tmp_path)
    d = torch.randn(2, 3)
    net(d=d, l=torch.tensor([1.0, 0.0]))
    with h5py.File(out, "r") as f:
        assert f["data"].shape == (2, 3, 1, 1) and f["label"].shape == (2, 1, 1, 1)
        assert np.array_equal(f["data"][:].reshape(2, 3), d.numpy())
    with pytest.raises(ResnetcError, match="one batch"):
        net(d=d, l=torch.tensor([1.0, 0.0]))


def onnx_matches_torch(net, inputs: dict, tmp_path, export_inputs: dict = None) -> None:
    """Export ``net`` (TorchScript exporter, dynamic batch axis, as resnetc.export does) with ``export_inputs``,
    then run ``inputs`` (another batch size) in onnxruntime: every output equals torch's."""
    ort = pytest.importorskip("onnxruntime")
    names, outputs = list(inputs), net.outputs

    class Wrap(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, *args):
            out = self.n(**dict(zip(names, args)))
            return tuple(out[k] for k in outputs)

    ex = export_inputs or {k: v[:2] for k, v in inputs.items()}
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(Wrap(net), tuple(ex[k] for k in names), path, input_names=names, output_names=outputs,
                      dynamo=False, dynamic_axes={k: {0: "N"} for k in names + outputs})
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    want = net(**inputs)
    for k, got in zip(outputs, sess.run(None, {k: v.numpy() for k, v in inputs.items()})):
        w = want[k].detach().numpy()
        assert got.shape == w.shape, f"{k}: {got.shape} != {w.shape}"
        assert np.allclose(got, w, atol=1e-5), f"{k}: onnxruntime differs from torch"


def test_onnx_export_of_plumbing(tmp_path):
    text = (inp("a", 2, 6, 4) + inp("b", 2, 6, 4) + inp("r", 2, 3, 2)
            + 'layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "m" eltwise_param { operation: MAX } }\n'
            + 'layer { name: "s" type: "Slice" bottom: "m" top: "p" top: "q" slice_param { slice_point: 2 } }\n'
            + 'layer { name: "c" type: "Concat" bottom: "q" bottom: "p" top: "c" }\n'
            + 'layer { name: "rs" type: "Reshape" bottom: "c" top: "rs" reshape_param { shape { dim: 0 dim: -1 } } }\n'
            + 'layer { name: "sm" type: "Softmax" bottom: "rs" top: "sm" }\n'
            + 'layer { name: "cr" type: "Crop" bottom: "a" bottom: "r" top: "cr" crop_param { axis: 1 offset: 1 } }\n'
            + 'layer { name: "t" type: "Tile" bottom: "cr" top: "t" tile_param { axis: 1 tiles: 2 } }\n'
            + 'layer { name: "f" type: "Flatten" bottom: "t" top: "f" }\n'
            + 'layer { name: "red" type: "Reduction" bottom: "f" top: "red" '
              'reduction_param { axis: 1 operation: ASUM } }\n')
    net = net_from(text, tmp_path)
    onnx_matches_torch(net, {"a": torch.randn(5, 6, 4), "b": torch.randn(5, 6, 4), "r": torch.randn(5, 3, 2)},
                       tmp_path)


def test_onnx_export_of_argmax_ties_and_embed(tmp_path):
    text = (inp("x", 2, 6) + inp("i", 2, 3)
            + 'layer { name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { top_k: 3 out_max_val: true } }\n'
            + 'layer { name: "b" type: "ArgMax" bottom: "x" top: "z" argmax_param { axis: 1 } }\n'
            + 'layer { name: "e" type: "Embed" bottom: "i" top: "w" embed_param { num_output: 2 input_dim: 4 '
              'weight_filler { type: "gaussian" std: 1 } } }\n')
    net = net_from(text, tmp_path)
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0]] * 4)  # ties: Caffe orders them by descending index
    i = torch.tensor([[0.5, 3.9, 2.0]] * 4)
    onnx_matches_torch(net, {"x": x, "i": i}, tmp_path, export_inputs={"x": torch.randn(2, 6), "i": i[:2]})
    assert net(x=x, i=i)["y"][0].tolist() == [[4, 2, 1], [3, 3, 3]]


# ----------------------------------------------------------------------------------------------------------
# Corpus: every layer of these families in the real-world nets gets Caffe's top and parameter shapes


def _corpus_shapes() -> dict:
    import gzip
    import json

    path = os.path.join(ORACLE, "shapes", "shapes.json.gz")
    if not os.path.exists(path):
        return {}
    with gzip.open(path) as f:
        return json.load(f)


def _my_types() -> set:
    from resnetc.layers import registry

    registry.supported_types()
    return {n for n, e in registry.REGISTRY.items() if e.family in ("common", "neuron")}


SHAPES = _corpus_shapes()
CORPUS_KEYS = sorted(k for k, v in SHAPES.items() if set(v["layer_types"]) & _my_types())


@pytest.mark.parametrize("key", CORPUS_KEYS or ["<no oracle>"])
def test_corpus_layer_shapes_match_caffe(key, corpus):
    """Each layer of our families is fed Caffe's bottom shapes (from the shapes oracle) and must give Caffe's
    top and parameter shapes; independent of the other families' rules."""
    from resnetc.graph import Layer, filter_layers, insert_splits, make_state
    from resnetc.layers import registry

    v = SHAPES[key]
    src = read_net(os.path.join(corpus, key.split("@")[0]))
    kept = filter_layers(src, make_state(src.param, v["phase"], None, v.get("stages", ())))
    mine = _my_types()
    replaced = v.get("inputs_replaced") or {}
    checked = 0
    for lp in insert_splits(kept, src):
        if lp.type not in mine or lp.name in replaced:
            continue
        spec = registry.get(lp.type)
        layer = Layer(name=lp.name, type=lp.type, param=lp, bottoms=list(lp.bottom), tops=list(lp.top),
                      caffe_bottoms=list(lp.bottom), caffe_tops=list(lp.top), phase=v["phase"], spec=spec,
                      bottom_shapes=[tuple(v["blobs"][b]) for b in lp.bottom])
        if spec.check:
            spec.check(layer)
        tops = spec.shape(layer, layer.bottom_shapes)
        for t, shp in zip(lp.top, tops):
            assert shp == tuple(v["blobs"][t]), f"{lp.name} ({lp.type}) top {t}: {shp} != Caffe's {v['blobs'][t]}"
        if spec.params:
            got = [tuple(b.shape) for b in spec.params(layer, layer.bottom_shapes)]
            assert got == [tuple(s) for s in v["params"].get(lp.name, [])], f"params of {lp.name}: {got}"
        checked += 1
    assert checked
