"""train_val → deploy: the inference form of a net, as Caffe users write it by hand.

Data layers become ``Input`` layers of the transformed shape (batch from the layer or the caller; channels and
size from ``crop_size``, the data source or ``input_shapes``); label tops, loss and Accuracy layers and every layer
that only served them are dropped (GoogLeNet's auxiliary classifiers too: only the loss of largest weight keeps
its predictions); that loss, when a ``SoftmaxWithLoss``, becomes a ``Softmax`` named ``prob`` unless a Softmax of
its logits is already there; include/exclude rules, loss weights and propagate_down are removed.
A net that has no data layers and no losses is returned unchanged (it is already a deploy net).
"""
from __future__ import annotations

from typing import Optional

from .errors import ResnetcError
from .graph import build_graph, filter_layers, make_state
from .proto import caffe_pb2
from .prototxt import NetSource

LOSS_OR_METRIC = {"SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss", "HingeLoss", "InfogainLoss",
                  "MultinomialLogisticLoss", "ContrastiveLoss", "Accuracy", "Silence"}


def is_deploy(src: NetSource) -> bool:
    from .layers import registry

    for lp in src.param.layer:
        spec = registry.get(lp.type)
        if lp.type in LOSS_OR_METRIC or (spec is not None and spec.data):
            return False
    return True


def to_deploy(src: NetSource, *, batch: Optional[int] = None, input_shapes: Optional[dict] = None) -> NetSource:
    """The deploy form of ``src`` (a new NetSource; line numbers kept by layer name)."""
    from .layers import registry

    input_shapes = dict(input_shapes or {})
    if is_deploy(src) and not input_shapes and batch is None:
        return src
    kept = filter_layers(src, make_state(src.param, "TEST"))
    # the TEST-phase graph without its losses and metrics tells the data tops' shapes (with the sources, when
    # present); losses are left out because a caller's input shape may not agree with a label's batch
    shaped = caffe_pb2.NetParameter()
    shaped.CopyFrom(src.param)
    del shaped.layer[:]
    shaped.layer.extend(lp for lp in src.param.layer if lp.type not in LOSS_OR_METRIC)
    graph = build_graph(NetSource(param=shaped, file=src.file, lines=dict(src.lines)), "TEST",
                        input_shapes=input_shapes)
    shapes = {name: graph.shape(name) for name in graph.blob_alias}
    main_loss = _main_loss(kept)
    # outputs: tops nothing reads (an in-place layer does not count as a reader) and the main loss's predictions
    consumed = {b for lp in kept for b in lp.bottom if b not in lp.top}
    wanted = {t for lp in kept if lp.type not in LOSS_OR_METRIC for t in lp.top if t not in consumed}
    out = caffe_pb2.NetParameter()
    out.name = src.param.name
    available: set = set()
    inputs = []
    for lp in kept:
        spec = registry.get(lp.type)
        if spec is not None and spec.data:
            data_top = lp.top[0] if lp.top else None
            if data_top is None:
                continue
            shape = list(input_shapes.get(data_top) or shapes.get(data_top) or ())
            if not shape or any(d is None for d in shape):
                raise ResnetcError(f"the deploy input '{data_top}' needs a shape: its data source is not available "
                                   f"(give --input-shape {data_top}=N,C,H,W)", file=src.file,
                                   line=src.line_of(lp.name), layer=lp.name, layer_type=lp.type)
            if batch is not None:
                shape[0] = batch
            inputs.append((data_top, shape))
            available.add(data_top)
            continue
        if lp.type in LOSS_OR_METRIC:
            if lp is main_loss and lp.bottom[0] in available:
                wanted.add(_softmax_for(lp, out, kept) if lp.type == "SoftmaxWithLoss" else lp.bottom[0])
            continue
        if not all(b in available for b in lp.bottom):
            continue  # it depended on labels or on a dropped layer
        new = out.layer.add()
        new.CopyFrom(lp)
        new.ClearField("include")
        new.ClearField("exclude")
        new.ClearField("loss_weight")
        new.ClearField("propagate_down")
        available.update(new.top)
    _prune_to(out, wanted)
    if inputs:
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for name, shape in inputs:
            layer.top.append(name)
            layer.input_param.shape.add().dim.extend(int(d) for d in shape)
        merged = caffe_pb2.NetParameter()
        merged.name = out.name
        merged.layer.append(layer)
        merged.layer.extend(out.layer)
        out = merged
    if batch is not None:
        for lp in out.layer:
            if lp.type == "Input":
                for s in lp.input_param.shape:
                    if len(s.dim):
                        s.dim[0] = batch
    lines = dict(src.lines)
    return NetSource(param=out, file=src.file, lines=lines, upgrade_log=list(src.upgrade_log))


def _main_loss(kept):
    """The loss whose predictions a deploy net outputs: the largest loss weight, the last one on ties
    (GoogLeNet's auxiliary classifiers weigh 0.3 and are dropped; its main one weighs 1). A test net without
    losses outputs what its last Accuracy layer scores."""
    best, best_w = None, None
    for lp in kept:
        if lp.type in LOSS_OR_METRIC and lp.type not in ("Accuracy", "Silence") and lp.bottom:
            w = lp.loss_weight[0] if len(lp.loss_weight) else 1.0
            if best is None or w >= best_w:
                best, best_w = lp, w
    if best is None:
        for lp in kept:
            if lp.type == "Accuracy" and lp.bottom:
                best = lp
    return best


def _prune_to(out: caffe_pb2.NetParameter, wanted: set) -> None:
    """Keep only the layers some wanted output depends on (drops branches that served losses only)."""
    needed = set(wanted)
    keep = []
    for lp in reversed(out.layer):
        if any(t in needed for t in lp.top):
            keep.append(lp)
            needed.update(lp.bottom)
    keep.reverse()
    if len(keep) != len(out.layer):
        layers = [caffe_pb2.LayerParameter() for _ in keep]
        for dst, lp in zip(layers, keep):
            dst.CopyFrom(lp)
        del out.layer[:]
        out.layer.extend(layers)


def _softmax_for(loss: caffe_pb2.LayerParameter, out: caffe_pb2.NetParameter, kept) -> str:
    """A Softmax named ``prob`` over the loss's logits (or the Softmax already there); returns its top."""
    logits = loss.bottom[0]
    for lp in list(out.layer) + list(kept):
        if lp.type == "Softmax" and list(lp.bottom) == [logits]:
            return lp.top[0] if lp.top else logits
    names = {l.name for l in kept} | {l.name for l in out.layer}
    tops = {t for l in kept for t in l.top} | {t for l in out.layer for t in l.top}
    name = "prob" if "prob" not in names and "prob" not in tops else f"{loss.name}_prob"
    sm = out.layer.add()
    sm.name = name
    sm.type = "Softmax"
    sm.bottom.append(logits)
    sm.top.append(name)
    if loss.HasField("softmax_param"):
        sm.softmax_param.CopyFrom(loss.softmax_param)
    return name
