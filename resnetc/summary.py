"""The `summary` table of a LayerGraph: layer, type, top shapes, parameter count, multiply-adds; totals."""
from __future__ import annotations

import dataclasses

from .graph import LayerGraph

# layers whose cost is multiply-adds of weights with activations: the conventional "MACs" of a network
MAC_TYPES = frozenset({"Convolution", "Deconvolution", "InnerProduct", "RNN", "LSTM", "Im2col"})


def fmt_shape(shape) -> str:
    if shape is None:
        return "?"
    if len(shape) == 0:
        return "scalar"
    return "x".join("?" if d is None else str(d) for d in shape)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclasses.dataclass
class Row:
    name: str
    type: str
    tops: str
    params: int | None  # learnable values owned by this layer (shared ones counted once, at the owner)
    stats: int | None  # non-learnable values (BatchNorm statistics)
    macs: int | None


@dataclasses.dataclass
class Summary:
    rows: list
    learnable: int
    stats: int
    stats_layers: int
    macs: int  # over MAC_TYPES layers
    other_ops: int  # per-element arithmetic of the other layers (BatchNorm, Scale, Pooling, ...)
    complete: bool  # every size known

    def format(self) -> str:
        w_name = max([len("layer")] + [len(r.name) for r in self.rows])
        w_type = max([len("type")] + [len(r.type) for r in self.rows])
        w_tops = max([len("top shapes")] + [len(r.tops) for r in self.rows])
        lines = [f"{'layer':<{w_name}}  {'type':<{w_type}}  {'top shapes':<{w_tops}}  {'params':>12}  {'mult-adds':>15}"]
        lines.append("-" * len(lines[0]))
        for r in self.rows:
            p = "?" if r.params is None else (f"{r.params:,}" if r.params else "")
            if r.stats:
                p = (p + " " if p else "") + f"(+{r.stats:,} stats)"
            m = "?" if r.macs is None else (f"{r.macs:,}" if r.macs else "")
            lines.append(f"{r.name:<{w_name}}  {r.type:<{w_type}}  {r.tops:<{w_tops}}  {p:>12}  {m:>15}")
        lines.append("-" * len(lines[0]))
        q = "" if self.complete else " (lower bound: some sizes unknown)"
        lines.append(f"learnable parameters: {self.learnable:,}{q}")
        if self.stats:
            lines.append(f"BatchNorm statistics (not learnable): {self.stats:,} values in {self.stats_layers} layers")
        lines.append(f"multiply-adds per forward (Convolution, Deconvolution, InnerProduct, RNN/LSTM): {self.macs:,}{q}")
        if self.other_ops:
            lines.append(f"other arithmetic per forward (normalisation, pooling, ...): {self.other_ops:,} operations")
        return "\n".join(lines)


def summarize(graph: LayerGraph) -> Summary:
    rows = []
    learnable = stats = macs = other = 0
    stats_layers = 0
    complete = True
    for layer in graph.layers:
        tops = ", ".join(fmt_shape(s) for s in layer.top_shapes)
        if layer.blobs is None:
            p = s = None
            complete = False
        else:
            p = s = 0
            for i, b in enumerate(layer.blobs):
                if layer.shared_from and layer.shared_from[i] is not None:
                    continue
                if b.learnable:
                    p += _numel(b.shape)
                else:
                    s += _numel(b.shape)
            learnable += p
            stats += s
            stats_layers += 1 if s else 0
        m = None
        known = all(x is not None and None not in x for x in layer.bottom_shapes) and \
            all(x is not None and None not in x for x in layer.top_shapes)
        if layer.spec.flops is None:
            m = 0
        elif known:
            m = int(layer.spec.flops(layer, [tuple(b) for b in layer.bottom_shapes], [tuple(t) for t in layer.top_shapes]))
            if layer.type in MAC_TYPES:
                macs += m
            else:
                other += m
        else:
            complete = False
        rows.append(Row(layer.name, layer.type, tops, p, s, m))
    return Summary(rows, learnable, stats, stats_layers, macs, other, complete)
