"""LayerGraph: a Caffe net for one phase, as plain data (no torch).

Built the way Caffe's ``Net::Init`` does it (see CAFFE_SEMANTICS.md §1): filter layers by the NetState
rules, insert Split layers where a blob feeds several consumers (Caffe's own names), then walk the layers in
file order wiring blobs. In-place layers (top == bottom at the same index) get a new single-assignment blob
version; ``blob_alias`` maps every Caffe blob name to its final version, so ``net.blobs['conv1']`` is the
value after ``relu1`` ran, as in Caffe. Shapes are inferred with the registry's rules; a dimension that
cannot be known (a data source that is not here) stays ``None``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from .errors import ResnetcError
from .layers import registry
from .layers.registry import ParamBlob, ShapeError
from .prototxt import NetSource, read_net
from .proto import caffe_pb2

PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST}
PHASE_NAMES = {v: k for k, v in PHASES.items()}


@dataclasses.dataclass
class Layer:
    name: str
    type: str
    param: caffe_pb2.LayerParameter  # the layer's own copy (phase filled, splits renamed, like Caffe)
    bottoms: list  # SSA blob names
    tops: list  # SSA blob names
    caffe_bottoms: list  # blob names as Caffe sees them (after split insertion)
    caffe_tops: list
    phase: str  # "TRAIN" / "TEST": the layer's own phase (LayerParameter.phase, else the net's)
    line: Optional[int] = None
    file: Optional[str] = None
    bottom_shapes: list = dataclasses.field(default_factory=list)
    top_shapes: list = dataclasses.field(default_factory=list)
    blobs: list = dataclasses.field(default_factory=list)  # [ParamBlob]
    # per blob: (owner layer name, owner blob index) when this blob shares another layer's param
    shared_from: list = dataclasses.field(default_factory=list)
    lr_mult: list = dataclasses.field(default_factory=list)
    decay_mult: list = dataclasses.field(default_factory=list)
    loss_weights: list = dataclasses.field(default_factory=list)  # one per top
    inserted: bool = False  # a Split layer resnetc (like Caffe) inserted
    spec: Optional[registry.LayerType] = None

    def error(self, message: str) -> ResnetcError:
        return ResnetcError(message, file=self.file, line=self.line, layer=self.name, layer_type=self.type)

    @property
    def is_data(self) -> bool:
        return bool(self.spec and self.spec.data)


@dataclasses.dataclass
class LayerGraph:
    name: str
    phase: str
    layers: list  # [Layer] in execution (file) order
    inputs: list  # Caffe names of Input-layer tops (net.inputs), creation order
    data_tops: list  # Caffe names of data-layer tops (fed by an input pipeline)
    outputs: list  # Caffe names of net outputs, byte-wise sorted (Caffe keeps them in a std::set)
    blob_shapes: dict  # SSA name -> shape (tuple, may contain None) or None
    blob_alias: dict  # Caffe name -> final SSA name
    source: Optional[NetSource] = None
    force_backward: bool = False
    notes: list = dataclasses.field(default_factory=list)

    @property
    def file(self) -> Optional[str]:
        return self.source.file if self.source else None

    def layer(self, name: str) -> Layer:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def shape(self, caffe_blob: str):
        return self.blob_shapes.get(self.blob_alias.get(caffe_blob, caffe_blob))

    def output_ssa(self, caffe_blob: str) -> str:
        return self.blob_alias[caffe_blob]

    @property
    def shapes_known(self) -> bool:
        return all(s is not None and None not in s for s in self.blob_shapes.values())


# ----------------------------------------------------------------------------------------------------------
# NetState filtering (Caffe's FilterNet / StateMeetsRule)


def _state_meets_rule(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def make_state(net: caffe_pb2.NetParameter, phase: str, level: Optional[int] = None,
               stages=()) -> caffe_pb2.NetState:
    """NetState as ``Net(file, phase, level, stages)`` builds it: the file's state, phase overridden,
    stages appended."""
    state = caffe_pb2.NetState()
    state.CopyFrom(net.state)
    state.phase = PHASES[phase]
    if level is not None:
        state.level = level
    state.stage.extend(stages)
    return state


def filter_layers(src: NetSource, state: caffe_pb2.NetState) -> list:
    kept = []
    for lp in src.param.layer:
        if lp.include and lp.exclude:
            raise ResnetcError("a layer may have include rules or exclude rules, not both",
                               file=src.file, line=src.line_of(lp.name), layer=lp.name, layer_type=lp.type)
        if lp.include:
            keep = any(_state_meets_rule(state, r) for r in lp.include)
        else:
            keep = not any(_state_meets_rule(state, r) for r in lp.exclude)
        if keep:
            kept.append(lp)
    return kept


# ----------------------------------------------------------------------------------------------------------
# Split insertion (Caffe's InsertSplits, with its exact names)


def split_layer_name(blob: str, layer: str, top_idx: int) -> str:
    return f"{blob}_{layer}_{top_idx}_split"


def split_blob_name(blob: str, layer: str, top_idx: int, k: int) -> str:
    return f"{blob}_{layer}_{top_idx}_split_{k}"


def insert_splits(layers: list, src: NetSource) -> list:
    """Return a new list of LayerParameter copies with Split layers inserted, as Caffe does."""
    last_top = {}  # blob name -> (layer idx, top idx)
    source_of = {}  # (layer idx, bottom idx) -> (layer idx, top idx)
    consumers = {}  # (layer idx, top idx) -> count
    loss_w = {}
    for i, lp in enumerate(layers):
        for j, b in enumerate(lp.bottom):
            if b not in last_top:
                raise ResnetcError(f"unknown bottom blob '{b}' (bottom index {j}): no earlier layer produces it",
                                   file=src.file, line=src.line_of(lp.name), layer=lp.name, layer_type=lp.type)
            source_of[(i, j)] = last_top[b]
            consumers[last_top[b]] = consumers.get(last_top[b], 0) + 1
        for j, t in enumerate(lp.top):
            last_top[t] = (i, j)
        for j, w in enumerate(lp.loss_weight):
            if w != 0:
                loss_w[(i, j)] = w
                consumers[(i, j)] = consumers.get((i, j), 0) + 1
    out = []
    next_split = {}
    for i, lp in enumerate(layers):
        new = caffe_pb2.LayerParameter()
        new.CopyFrom(lp)
        out.append(new)
        for j, b in enumerate(lp.bottom):
            s = source_of[(i, j)]
            if consumers.get(s, 0) > 1:
                k = next_split.get(s, 0)
                next_split[s] = k + 1
                new.bottom[j] = split_blob_name(b, layers[s[0]].name, s[1], k)
        for j, t in enumerate(lp.top):
            n = consumers.get((i, j), 0)
            if n > 1:
                split = caffe_pb2.LayerParameter()
                split.name = split_layer_name(t, lp.name, j)
                split.type = "Split"
                split.bottom.append(t)
                for k in range(n):
                    split.top.append(split_blob_name(t, lp.name, j, k))
                if (i, j) in loss_w:
                    split.loss_weight.append(loss_w[(i, j)])
                    for _ in range(1, n):
                        split.loss_weight.append(0)
                    new.ClearField("loss_weight")
                    next_split[(i, j)] = 1
                out.append(split)
    return out


# ----------------------------------------------------------------------------------------------------------
# Build


def _check_counts(layer: Layer) -> None:
    spec = layer.spec
    nb, nt = len(layer.caffe_bottoms), len(layer.caffe_tops)
    lo, hi = spec.bottoms
    if nb < lo or (hi is not None and nb > hi):
        want = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
        raise layer.error(f"takes {want} bottom blob(s), got {nb}")
    lo, hi = spec.tops
    if nt < lo or (hi is not None and nt > hi):
        want = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
        raise layer.error(f"produces {want} top blob(s), got {nt}")


def unknown_type_error(lp, src: NetSource) -> ResnetcError:
    hint = ("it is not a BVLC Caffe layer type (a fork's or a custom layer); register it with "
            "resnetc.layers.register(...) to use it")
    if lp.type == "Python":
        hint = ("Python layers run user code and are disabled; enable them explicitly "
                "(allow_python_layers=True / --allow-python-layers) to import the module")
    supported = ", ".join(registry.supported_types())
    return ResnetcError(f"unknown layer type '{lp.type}': {hint}. Supported types: {supported}",
                        file=src.file, line=src.line_of(lp.name), layer=lp.name, layer_type=lp.type)


def build_graph(src, phase: str = "TEST", *, level: Optional[int] = None, stages=(),
                input_shapes: Optional[dict] = None, state: Optional[caffe_pb2.NetState] = None,
                allow_python_layers: bool = False) -> LayerGraph:
    """Build the LayerGraph of ``src`` (a NetSource, or a path) for ``phase``.

    ``input_shapes`` {blob: shape} overrides the shapes of Input / data-layer tops (the command line's
    ``--input-shape``). ``state`` overrides the whole NetState (the solver builds its own).
    """
    if not isinstance(src, NetSource):
        src = read_net(os.fspath(src))
    phase = phase.upper()
    if phase not in PHASES:
        raise ResnetcError(f"unknown phase '{phase}' (TRAIN or TEST)")
    if state is None:
        state = make_state(src.param, phase, level, stages)
    phase = PHASE_NAMES[state.phase]
    input_shapes = dict(input_shapes or {})
    kept = filter_layers(src, state)
    params = insert_splits(kept, src)

    graph = LayerGraph(name=src.param.name, phase=phase, layers=[], inputs=[], data_tops=[], outputs=[],
                       blob_shapes={}, blob_alias={}, source=src, force_backward=src.param.force_backward)
    available = {}  # Caffe name -> SSA name of blobs produced and not yet consumed
    produced = set()
    version = {}
    owners = {}  # param name -> (layer, blob index, ParamBlob, lr_explicit, decay_explicit)
    for lp in params:
        spec = registry.get(lp.type)
        line = src.line_of(lp.name)
        if spec is None:
            raise unknown_type_error(lp, src)
        if lp.type == "Python" and not allow_python_layers:
            raise unknown_type_error(lp, src)
        if not lp.HasField("phase"):
            lp.phase = state.phase
        auto_top = spec.loss and len(lp.top) == 0
        if auto_top:
            # Caffe's AutoTopBlobs: a loss layer with no top gets an anonymous one (never an output or a bottom)
            lp.top.append(f"(automatic:{lp.name})")
        layer = Layer(name=lp.name, type=lp.type, param=lp, bottoms=[], tops=[], caffe_bottoms=list(lp.bottom),
                      caffe_tops=list(lp.top), phase=PHASE_NAMES[lp.phase], line=line, file=src.file,
                      spec=spec, inserted=lp.type == "Split" and lp.name.endswith("_split") and line is None)
        _check_counts(layer)
        if lp.propagate_down and len(lp.propagate_down) != len(lp.bottom):
            raise layer.error(f"propagate_down has {len(lp.propagate_down)} entries; it needs 0 or one per bottom "
                              f"({len(lp.bottom)})")
        # wire bottoms
        for j, b in enumerate(lp.bottom):
            if b not in available:
                if b in produced:
                    raise layer.error(f"bottom blob '{b}' (bottom index {j}) was already consumed by an earlier layer")
                raise layer.error(f"unknown bottom blob '{b}' (bottom index {j}): no earlier layer produces it")
            layer.bottoms.append(available[b])
        # wire tops
        for j, t in enumerate(lp.top):
            in_place = j < len(lp.bottom) and lp.bottom[j] == t
            if in_place:
                if not spec.in_place:
                    raise layer.error(f"{lp.type} cannot run in place (top '{t}' is also its bottom)")
                version[t] = version.get(t, 0) + 1
                ssa = f"{t}#{version[t]}"
            else:
                if t in produced:
                    raise layer.error(f"top blob '{t}' is produced by multiple layers (only in-place reuse at the "
                                      f"same bottom index is allowed)")
                ssa = t
            produced.add(t)
            layer.tops.append(ssa)
        for b in lp.bottom:
            available.pop(b, None)
        for t, ssa in zip(lp.top, layer.tops):
            graph.blob_alias[t] = ssa
            if not t.startswith("(automatic:"):
                available[t] = ssa
        # loss weights
        if lp.loss_weight:
            if len(lp.loss_weight) != len(lp.top):
                raise layer.error(f"{len(lp.loss_weight)} loss_weight value(s) for {len(lp.top)} top(s): "
                                  f"give one per top")
            layer.loss_weights = list(lp.loss_weight)
        elif spec.loss:
            if len(lp.top) > 1:
                raise layer.error(f"a {lp.type} with {len(lp.top)} tops needs one loss_weight per top "
                                  f"(e.g. loss_weight: 1 loss_weight: 0)")
            layer.loss_weights = [1.0] * len(lp.top)
        else:
            layer.loss_weights = [0.0] * len(lp.top)
        if lp.type == "Input":
            graph.inputs.extend(lp.top)
        if spec.data:
            graph.data_tops.extend(lp.top)
        # shapes
        layer.bottom_shapes = [graph.blob_shapes.get(s) for s in layer.bottoms]
        _infer(layer, graph, input_shapes)
        for ssa, shp in zip(layer.tops, layer.top_shapes):
            graph.blob_shapes[ssa] = shp
        _wire_params(layer, owners)
        graph.layers.append(layer)
    graph.outputs = sorted(available, key=lambda s: s.encode("utf-8"))
    return graph


def _known(shape) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _infer(layer: Layer, graph: LayerGraph, input_shapes: dict) -> None:
    spec = layer.spec
    try:
        if spec.check:
            spec.check(layer)
        if all(_known(s) for s in layer.bottom_shapes):
            tops = spec.shape(layer, [tuple(s) for s in layer.bottom_shapes])
            tops = [tuple(t) if t is not None else None for t in tops]
            if len(tops) != len(layer.tops):
                raise ShapeError(f"internal: shape rule gave {len(tops)} tops for {len(layer.tops)}")
            for t in tops:
                if t is not None and any(d is not None and d < 0 for d in t):
                    raise ShapeError(f"negative output size {t}")
        else:
            tops = [None] * len(layer.tops)
        for j, name in enumerate(layer.caffe_tops):
            if name in input_shapes and (layer.type == "Input" or spec.data):
                tops[j] = tuple(int(d) for d in input_shapes[name])
        layer.top_shapes = tops
        if spec.params and all(_known(s) for s in layer.bottom_shapes):
            layer.blobs = list(spec.params(layer, [tuple(s) for s in layer.bottom_shapes]))
        elif spec.params:
            layer.blobs = None  # unknown until the input sizes are known
        else:
            layer.blobs = []
    except ResnetcError as e:
        raise e.at(file=layer.file, line=layer.line, layer=layer.name, layer_type=layer.type) from None
    except (ValueError, ZeroDivisionError, IndexError, TypeError) as e:
        raise layer.error(f"invalid parameters or shapes ({type(e).__name__}: {e}); bottoms "
                          f"{[_fmt(s) for s in layer.bottom_shapes]}") from None
    if layer.blobs is not None and len(layer.param.blobs) and spec.params:
        pass  # blobs given in the prototxt: weights.py checks and loads them


def _fmt(shape) -> str:
    if shape is None:
        return "?"
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


def _wire_params(layer: Layer, owners: dict) -> None:
    """ParamSpecs: lr/decay multipliers and sharing by name (Caffe's AppendParam)."""
    specs = list(layer.param.param)
    n = len(layer.blobs) if layer.blobs is not None else None
    if n is not None and len(specs) > n:
        raise layer.error(f"too many param specs ({len(specs)}) for a layer with {n} parameter blob(s)")
    if layer.type == "BatchNorm":
        for s in specs:
            if s.HasField("lr_mult") and s.lr_mult != 0:
                raise layer.error("BatchNorm statistics cannot be learned: its param specs must have lr_mult: 0")
    layer.lr_mult, layer.decay_mult, layer.shared_from = [], [], []
    if n is None:
        return
    for i in range(n):
        s = specs[i] if i < len(specs) else caffe_pb2.ParamSpec()
        blob = layer.blobs[i]
        lr = s.lr_mult if s.HasField("lr_mult") else 1.0
        dm = s.decay_mult if s.HasField("decay_mult") else 1.0
        if not blob.learnable:
            lr = 0.0 if not s.HasField("lr_mult") else lr
        shared = None
        if s.name:
            if s.name in owners:
                o_layer, o_idx, o_blob, o_lr_exp, o_dm_exp = owners[s.name]
                if s.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
                    ok = _numel(o_blob.shape) == _numel(blob.shape)
                else:
                    ok = tuple(o_blob.shape) == tuple(blob.shape)
                if not ok:
                    raise layer.error(f"shared parameter '{s.name}' (blob {i}) has shape {_fmt(blob.shape)} but its "
                                      f"owner '{o_layer.name}' has {_fmt(o_blob.shape)}")
                if s.HasField("lr_mult") and o_lr_exp and o_layer.lr_mult[o_idx] != lr:
                    raise layer.error(f"shared parameter '{s.name}' has mismatched lr_mult")
                if s.HasField("decay_mult") and o_dm_exp and o_layer.decay_mult[o_idx] != dm:
                    raise layer.error(f"shared parameter '{s.name}' has mismatched decay_mult")
                if s.HasField("lr_mult") and not o_lr_exp:
                    o_layer.lr_mult[o_idx] = lr
                if s.HasField("decay_mult") and not o_dm_exp:
                    o_layer.decay_mult[o_idx] = dm
                shared = (o_layer.name, o_idx)
                lr, dm = o_layer.lr_mult[o_idx], o_layer.decay_mult[o_idx]
            else:
                owners[s.name] = (layer, i, blob, s.HasField("lr_mult"), s.HasField("decay_mult"))
        layer.lr_mult.append(lr)
        layer.decay_mult.append(dm)
        layer.shared_from.append(shared)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
