"""CaffeNet's execution plan: BatchNorm+Scale fusion, in-place ReLU, Split aliasing and ``keep_blobs`` give the
same numbers (outputs, parameter gradients, BatchNorm statistics, ``net.blobs``) as running every layer as its
own module (``keep_blobs='all'``)."""
from __future__ import annotations

import pytest
import torch

from resnetc import load_net
from resnetc.layers.norm import BatchNormScale
from resnetc.prototxt import parse_net_text

BLOCK = '''
name: "block"
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { moving_average_fraction: 0.9 } }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false weight_filler { type: "msra" } } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "bn2" }
layer { name: "sc2" type: "Scale" bottom: "bn2" top: "sc2" }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "sc2" top: "sum" }
layer { name: "relu2" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
'''


def _nets(phase):
    nets = {}
    for keep in (True, False, "all"):
        net = load_net(parse_net_text(BLOCK), phase=phase, seed=3)
        net.keep_blobs = keep
        nets[keep] = net
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, blobs in nets[True].params.items():
            for i, b in enumerate(blobs):
                if name.startswith("bn") and i == 2:
                    value = torch.full(b.shape, 2.0)
                else:
                    value = torch.rand(b.shape, generator=g) + 0.5
                for net in nets.values():
                    net.params[name][i].copy_(value)
    return nets


def _fused(net, grad=True):
    return sum(isinstance(step[0], BatchNormScale) for step in net.execution_plan(grad))


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_plans_agree(phase):
    nets = _nets(phase)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(4, 3, 6, 6, generator=g)
    label = torch.tensor([0, 1, 2, 4])
    results = {}
    for keep, net in nets.items():
        for _ in range(2):  # twice: the running statistics are updated from the updated blobs
            out = net(data=data, label=label)
        net.total_loss().backward()
        grads = {(n, i): p.grad.clone() for n, ps in net.params.items() for i, p in enumerate(ps)
                 if p.grad is not None}
        stats = {n: [p.detach().clone() for p in ps] for n, ps in net.params.items() if n.startswith("bn")}
        results[keep] = (out["loss"].detach(), grads, stats)
    ref_loss, ref_grads, ref_stats = results["all"]
    for keep in (True, False):
        loss, grads, stats = results[keep]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)
        for n in stats:
            for a, b in zip(stats[n], ref_stats[n]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # only the in-place pair fuses: bn2's top is the Caffe blob "bn2", which net.blobs must show
    assert _fused(nets[True]) == 1 and _fused(nets["all"]) == 0
    assert _fused(nets[False]) == 2
    for name in nets["all"].blobs:
        torch.testing.assert_close(nets[True].blobs[name], nets["all"].blobs[name], rtol=1e-5, atol=1e-6)
    assert set(nets[True].blobs) == set(nets["all"].blobs)
    assert set(nets[False].blobs) == {"data", "label", "loss"}
    with pytest.raises(KeyError, match="keep_blobs"):
        nets[False].blobs["conv1"]


def test_inplace_relu_keeps_chain_start_for_diffs():
    """With gradients, the first version of an in-place chain stays (pycaffe reports its gradient as the blob's
    diff), so the ReLU after the sum runs out of place; without gradients it runs in place."""
    net = _nets("TRAIN")[True]
    relu2 = net.layer_modules["relu2"]
    with_grad = [s for s in net.execution_plan(True) if s[2] == ("sum#1",)][0]
    no_grad = [s for s in net.execution_plan(False) if s[2] == ("sum#1",)][0]
    assert with_grad[0] is relu2 and no_grad[0] == relu2.inplace
    net(data=torch.randn(4, 3, 6, 6), label=torch.tensor([0, 1, 2, 3]))
    assert "conv1" in net._env and "sum" in net._env  # chain starts kept for their diffs


def test_hooks_fire_through_fused_layers():
    net = _nets("TEST")[True]
    seen = []
    net.layer_modules["sc1"].register_forward_hook(lambda m, i, o: seen.append("sc1"))
    net.layer_modules["relu1"].register_forward_hook(lambda m, i, o: seen.append("relu1"))
    net(data=torch.randn(4, 3, 6, 6), label=torch.tensor([0, 1, 2, 3]))
    assert seen == ["sc1", "relu1"]


def test_plan_rebuilt_after_edits():
    """Editing the per-layer plan (as export.fold_batchnorm does) or keep_blobs rebuilds the execution plan."""
    from resnetc.export import fold_batchnorm

    nets = _nets("TEST")
    net, ref = nets[True], nets["all"]
    data, label = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        expected = ref(data=data, label=label)["loss"]
        net(data=data, label=label)
        assert fold_batchnorm(net)
        torch.testing.assert_close(net(data=data, label=label)["loss"], expected, rtol=1e-4, atol=1e-5)
        assert _fused(net) == 0
    net.keep_blobs = False
    net(data=data, label=label)
    assert set(net.blobs) == {"data", "label", "loss"}
    with pytest.raises(ValueError):
        net.keep_blobs = "some"


def test_auto_keeps_blobs_in_eager():
    net = load_net(parse_net_text(BLOCK), phase="TEST", seed=3)
    assert net.keep_blobs == "auto"
    assert net.execution_plan(True) is net.execution_plan(True, keep=True)
    net(data=torch.randn(4, 3, 6, 6), label=torch.tensor([0, 1, 2, 3]))
    assert {"conv1", "bn2", "sc2", "sum"} <= set(net.blobs)
