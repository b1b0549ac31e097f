"""Solvers following the ResNet papers' training recipes (He et al., CVPR 2016).

* ImageNet (§3.4): SGD, momentum 0.9, weight decay 1e-4, mini-batch 256, learning rate 0.1 divided by 10
  every 150k iterations (30 epochs of 256 images), 600k iterations. The train_val's Data layer reads 32
  images and ``iter_size: 8`` accumulates them to the paper's 256 on one GPU (an Input-fed net of batch N gets 256/N); with k GPUs (each takes its own
  ``batch_size``, as in Caffe) lower ``iter_size`` to 8/k. Testing: 1000 × 50 = the 50,000 validation images.
* CIFAR (§4.2): SGD, momentum 0.9, weight decay 1e-4, mini-batch 128, learning rate 0.1 divided by 10 at 32k
  and 48k iterations, 64k iterations. Testing: 100 × 100 = the 10,000 test images. (The paper's 0.01 warm-up
  for ResNet-110 is not part of this recipe.)

A net fed by Input blobs has no test data, so its solver has no test settings; its ``iter_size`` brings its batch
to the paper's mini-batch.
"""
from __future__ import annotations

from ..proto import caffe_pb2

__all__ = ["imagenet_solver", "cifar_solver"]


def _common(net: str, snapshot_prefix: str) -> caffe_pb2.SolverParameter:
    s = caffe_pb2.SolverParameter()
    s.net = net
    s.type = "SGD"
    s.base_lr = 0.1
    s.momentum = 0.9
    s.weight_decay = 0.0001
    s.gamma = 0.1
    s.snapshot_prefix = snapshot_prefix
    s.solver_mode = caffe_pb2.SolverParameter.GPU
    return s


IMAGENET_BATCH = 256
CIFAR_BATCH = 128


def _iter_size(paper_batch: int, batch: int) -> int:
    """Accumulate ``batch``-sized iterations up to the paper's mini-batch (at least one)."""
    return max(1, paper_batch // max(1, batch))


def imagenet_solver(net: str, snapshot_prefix: str, *, with_test: bool = True,
                    batch: int = 32) -> caffe_pb2.SolverParameter:
    """``batch``: the train net's batch size; ``iter_size`` brings it to 256."""
    s = _common(net, snapshot_prefix)
    if with_test:
        s.test_iter.append(1000)
        s.test_interval = 10000
        s.test_initialization = False
    s.lr_policy = "step"
    s.stepsize = 150000
    s.max_iter = 600000
    s.iter_size = _iter_size(IMAGENET_BATCH, batch)
    s.display = 20
    s.average_loss = 20
    s.snapshot = 10000
    return s


def cifar_solver(net: str, snapshot_prefix: str, *, with_test: bool = True,
                 batch: int = 128) -> caffe_pb2.SolverParameter:
    """``batch``: the train net's batch size; a smaller one gets ``iter_size`` up to 128."""
    s = _common(net, snapshot_prefix)
    if with_test:
        s.test_iter.append(100)
        s.test_interval = 1000
        s.test_initialization = False
    s.lr_policy = "multistep"
    s.stepvalue.extend([32000, 48000])
    s.max_iter = 64000
    s.display = 100
    iters = _iter_size(CIFAR_BATCH, batch)
    if iters > 1:
        s.iter_size = iters
    s.average_loss = 100
    s.snapshot = 16000
    return s
