"""ResNets written by hand in PyTorch, layer for layer the same networks as resnetc's specs, for benchmarks.

``resnet50_caffe()`` is Kaiming He's released ResNet-50 (conv1 with bias, stride on the first 1x1 of a
down-sampling block, Caffe's ceil-mode max pool); ``resnet_cifar(n)`` is the CIFAR ResNet-(6n+2) with 1x1
projection shortcuts (option B) as in specs/resnet20.prototxt. ``copy_from_caffenet`` gives a model a
CaffeNet's weights so outputs can be compared.

They do the same work as the CaffeNet's default execution plan (``net.keep_blobs = True``), no less and no
more, so that a benchmark compares the cost of the lowering and not two different programs:

* layers run in Caffe's order (a down-sampling block computes its projection branch1 first; the sum is
  ``shortcut + branch``, Caffe's bottom order);
* BatchNorm + Scale is one affine ``BatchNorm2d`` (resnetc fuses the pair into one ``batch_norm`` call);
* every ReLU overwrites its input (``relu_``), as resnetc's in-place ReLU does wherever nothing else reads
  that input (with ``keep_blobs=True`` and gradients enabled resnetc keeps the residual sum ``res2a``, whose
  gradient pycaffe reports as the blob's diff, so the ReLU after a sum then writes a new tensor: part of the
  cost of keeping Caffe's blobs, which the benchmarks report apart);
* global average pooling is a mean over H, W, the classifier a ``Linear``; the loss (train) is
  ``cross_entropy`` = Caffe's SoftmaxWithLoss with its default VALID normalisation.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride, project):
        super().__init__()
        # definition order = Caffe's layer order (the projection branch1 comes first), for copy_from_caffenet
        self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if project else None
        self.bn_p = nn.BatchNorm2d(cout, eps=1e-5) if project else None
        self.conv_a = nn.Conv2d(cin, mid, 1, stride, bias=False)
        self.bn_a = nn.BatchNorm2d(mid, eps=1e-5)
        self.conv_b = nn.Conv2d(mid, mid, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(mid, eps=1e-5)
        self.conv_c = nn.Conv2d(mid, cout, 1, 1, bias=False)
        self.bn_c = nn.BatchNorm2d(cout, eps=1e-5)

    def forward(self, x):
        s = self.bn_p(self.proj(x)) if self.proj is not None else x
        y = F.relu_(self.bn_a(self.conv_a(x)))
        y = F.relu_(self.bn_b(self.conv_b(y)))
        y = self.bn_c(self.conv_c(y))
        return F.relu_(s + y)


class ResNet50Caffe(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=True)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        blocks = []
        cin = 64
        for stage, (mid, n, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]):
            for i in range(n):
                blocks.append(Bottleneck(cin, mid, mid * 4, stride if i == 0 else 1, i == 0))
                cin = mid * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = F.relu_(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 3, 2, 0, ceil_mode=True)
        x = self.blocks(x)
        x = F.avg_pool2d(x, 7, 1)
        return self.fc(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        project = stride != 1 or cin != cout
        self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if project else None
        self.bn_p = nn.BatchNorm2d(cout) if project else None
        self.conv_a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(cout)
        self.conv_b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(cout)

    def forward(self, x):
        s = self.bn_p(self.proj(x)) if self.proj is not None else x
        y = F.relu_(self.bn_a(self.conv_a(x)))
        y = self.bn_b(self.conv_b(y))
        return F.relu_(s + y)


class ResNetCifar(nn.Module):
    def __init__(self, n=3, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, cout in enumerate([16, 32, 64]):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu_(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        x = x.mean((2, 3), keepdim=True)
        return self.fc(torch.flatten(x, 1))


def resnet50_caffe(num_classes=1000) -> ResNet50Caffe:
    return ResNet50Caffe(num_classes)


def resnet_cifar(n=3, num_classes=10) -> ResNetCifar:
    return ResNetCifar(n, num_classes)


def copy_from_caffenet(model: nn.Module, net) -> None:
    """Copy a CaffeNet's weights into a hand-written model, matching layers in execution order: each Convolution
    / InnerProduct to the next Conv2d / Linear, each BatchNorm (+ following Scale) to the next BatchNorm2d."""
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    layers = net.graph.layers
    ci = bi = 0
    with torch.no_grad():
        for i, layer in enumerate(layers):
            p = net.params.get(layer.name)
            if layer.type in ("Convolution", "InnerProduct"):
                m = convs[ci]
                ci += 1
                m.weight.copy_(p[0].reshape(m.weight.shape))
                if m.bias is not None:
                    m.bias.copy_(p[1] if len(p) > 1 else torch.zeros_like(m.bias))
            elif layer.type == "BatchNorm":
                m = bns[bi]
                bi += 1
                s = float(p[2].reshape(-1)[0])
                s = 0.0 if s == 0 else 1.0 / s
                m.running_mean.copy_(p[0] * s)
                m.running_var.copy_(p[1] * s)
                m.eps = layer.param.batch_norm_param.eps
                m.momentum = 1.0 - layer.param.batch_norm_param.moving_average_fraction
                nxt = layers[i + 1] if i + 1 < len(layers) else None
                if nxt is not None and nxt.type == "Scale":
                    sp = net.params[nxt.name]
                    m.weight.copy_(sp[0])
                    m.bias.copy_(sp[1] if len(sp) > 1 else torch.zeros_like(m.bias))
                else:
                    m.weight.fill_(1)
                    m.bias.zero_()
    assert ci == len(convs) and bi == len(bns), "layer structure differs from the hand-written model"
