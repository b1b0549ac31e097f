"""Draw a net like Caffe's draw_net.py: layers as boxes with their key parameters, blobs as octagons with their
shapes, in Graphviz DOT; rendered by Debian's ``dot`` binary (package ``graphviz``)."""
from __future__ import annotations

import os
import shutil
import subprocess

from .atomic import atomic_path, write_text
from .errors import ResnetcError
from .graph import LayerGraph
from .summary import fmt_shape

LAYER_STYLE = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900", "InnerProduct": "#CC33FF",
               "BatchNorm": "#66CCCC", "Scale": "#66CCCC", "ReLU": "#99CC66", "Eltwise": "#6699FF"}


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def layer_label(layer) -> str:
    p = layer.param
    parts = [f"{layer.name}", f"({layer.type})"]
    if layer.type in ("Convolution", "Deconvolution"):
        c = p.convolution_param
        k = list(c.kernel_size) or [c.kernel_h, c.kernel_w]
        s = list(c.stride) or ([c.stride_h, c.stride_w] if c.stride_h else [1])
        pad = list(c.pad) or ([c.pad_h, c.pad_w] if c.pad_h or c.pad_w else [0])
        parts.append(f"kernel {'x'.join(map(str, k))} stride {'x'.join(map(str, s))} pad {'x'.join(map(str, pad))}")
        parts.append(f"{c.num_output} outputs" + (f", group {c.group}" if c.group > 1 else ""))
    elif layer.type == "Pooling":
        q = p.pooling_param
        kind = q.PoolMethod.Name(q.pool)
        if q.global_pooling:
            parts.append(f"{kind} global")
        else:
            parts.append(f"{kind} kernel {q.kernel_size or q.kernel_h} stride {q.stride or q.stride_h} pad {q.pad or q.pad_h}")
    elif layer.type == "InnerProduct":
        parts.append(f"{p.inner_product_param.num_output} outputs")
    elif layer.type == "LRN":
        parts.append(f"size {p.lrn_param.local_size}")
    elif layer.type == "Eltwise":
        parts.append(p.eltwise_param.EltwiseOp.Name(p.eltwise_param.operation))
    return "\\n".join(_q(x)[1:-1] for x in parts)


def to_dot(graph: LayerGraph, rankdir: str = "LR") -> str:
    lines = [f"digraph {_q(graph.name or 'net')} {{", f"  rankdir={rankdir};",
             '  node [fontname="Helvetica", fontsize=10];']
    blob_nodes = set()

    def blob(ssa):
        node = "blob_" + ssa
        if node not in blob_nodes:
            blob_nodes.add(node)
            name = ssa.split("#")[0]
            lines.append(f"  {_q(node)} [shape=octagon, style=filled, fillcolor=\"#E0E0E0\", "
                         f"label=\"{_q(name)[1:-1]}\\n{fmt_shape(graph.blob_shapes.get(ssa))}\"];")
        return node

    for i, layer in enumerate(graph.layers):
        node = f"layer_{i}"
        color = LAYER_STYLE.get(layer.type, "#6495ED")
        lines.append(f"  {_q(node)} [shape=record, style=filled, fillcolor=\"{color}\", label=\"{layer_label(layer)}\"];")
        for b in layer.bottoms:
            lines.append(f"  {_q(blob(b))} -> {_q(node)};")
        for t in layer.tops:
            lines.append(f"  {_q(node)} -> {_q(blob(t))};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw(graph: LayerGraph, out: str, rankdir: str = "LR") -> None:
    dot_text = to_dot(graph, rankdir)
    fmt = out.rsplit(".", 1)[-1].lower() if "." in os.path.basename(out) else ""
    if fmt == "dot" or fmt == "gv":
        write_text(out, dot_text)
        return
    if fmt not in ("png", "svg", "pdf", "jpg", "jpeg"):
        raise ResnetcError(f"cannot draw to '{out}': use a .png, .svg, .pdf or .dot file name")
    exe = shutil.which("dot")
    if exe is None:
        raise ResnetcError("drawing needs Graphviz's `dot` program: install the Debian package `graphviz` "
                           "(apt-get install graphviz), or write a .dot file instead")
    with atomic_path(out) as tmp:
        p = subprocess.run([exe, f"-T{'jpg' if fmt == 'jpeg' else fmt}", "-o", tmp], input=dot_text, text=True,
                           capture_output=True, timeout=300)
        if p.returncode != 0:
            raise ResnetcError(f"dot failed: {(p.stderr or '').strip().splitlines()[:1]}")
