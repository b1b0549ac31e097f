"""Forward-only evaluation: the solver's test pass (``Solver::Test``) and ``resnetc test`` (``caffe test``).

Both accumulate every element of every output blob (outputs in Caffe's sorted order, flattened) in float32
over the batches and report the means; loss blobs (loss weight ≠ 0) get `` (* w = w·mean loss)``.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .numfmt import g

f32 = np.float32


def output_loss_weights(graph) -> dict:
    """{Caffe blob name: loss weight} (the last layer writing a blob sets it, as Caffe's blob_loss_weights)."""
    weights = {}
    for layer in graph.layers:
        for name, w in zip(layer.caffe_tops, layer.loss_weights):
            weights[name] = w
    return weights


def flat_outputs(outs: dict):
    """(names per element, float32 vector) of a forward's outputs, in output order."""
    names, parts = [], []
    for name, t in outs.items():
        t = t.detach().reshape(-1)
        names.extend([name] * t.numel())
        parts.append(t.float())
    if not parts:
        return names, np.zeros(0, np.float32)
    return names, torch.cat(parts).cpu().numpy().astype(np.float32)


def loss_note(w: float, value) -> str:
    if not w:
        return ""
    return f" (* {g(f32(w))} = {g(f32(w) * f32(value))} loss)"


class Accumulator:
    """Sum of output vectors (and losses) over batches, in float32 like Caffe's ``vector<Dtype>``."""

    def __init__(self):
        self.names = None
        self.scores = None
        self.loss = f32(0)
        self.n = 0

    def add(self, outs: dict, loss=None):
        names, vec = flat_outputs(outs)
        if self.scores is None:
            self.names, self.scores = names, vec.copy()
        else:
            self.scores = (self.scores + vec).astype(np.float32)
        if loss is not None:
            self.loss = f32(self.loss + f32(loss))
        self.n += 1
        return names, vec

    def means(self, count: int):
        if self.scores is None:
            return []
        return [(name, f32(s / f32(count))) for name, s in zip(self.names, self.scores)]


def test_pass(net, feed, iterations: int, *, compute_loss: bool, log: logging.Logger, weights: dict) -> list:
    """One ``Solver::Test`` pass over ``iterations`` batches; logs Caffe's lines; returns [(name, mean)]."""
    acc = Accumulator()
    with torch.no_grad():
        for _ in range(iterations):
            outs = net(**feed())
            acc.add(outs, net.total_loss().item() if compute_loss else None)
    if compute_loss:
        log.info("Test loss: %s", g(f32(acc.loss / f32(iterations))))
    means = acc.means(iterations)
    for i, (name, mean) in enumerate(means):
        log.info("    Test net output #%d: %s = %s%s", i, name, g(mean), loss_note(weights.get(name, 0), mean))
    return means


def run_test_command(net, feed, iterations: int, log: logging.Logger) -> list:
    """``caffe test``: per batch ``Batch i, blob = v``; then ``Loss: mean`` and the mean of each output."""
    weights = output_loss_weights(net.graph)
    acc = Accumulator()
    log.info("Running for %d iterations.", iterations)
    with torch.no_grad():
        for i in range(iterations):
            outs = net(**feed())
            loss = net.total_loss().item()
            names, vec = acc.add(outs, loss)
            for name, v in zip(names, vec):
                log.info("Batch %d, %s = %s", i, name, g(v))
    log.info("Loss: %s", g(f32(acc.loss / f32(iterations))))
    means = acc.means(iterations)
    for name, mean in means:
        log.info("%s = %s%s", name, g(mean), loss_note(weights.get(name, 0), mean))
    return means
