"""Legacy V0/V1 nets and deprecated solver fields -> today's form, exactly as Caffe's
``src/caffe/util/upgrade_proto.cpp`` does it (CAFFE_SEMANTICS.md §3).

INTERFACE (stable): ``upgrade_net(net, source) -> list[str]`` upgrades a NetParameter in place and returns
the log lines it emitted; ``upgrade_solver(solver, source) -> list[str]`` does the same for a SolverParameter.
The ``*_as_needed`` variants return an :class:`UpgradeReport` that also says whether Caffe would have
called the upgrade fully successful (it is not when e.g. a V0 field sits on the wrong layer type; Caffe
logs an ERROR and continues). What Caffe treats as FATAL raises :class:`ResnetcError` naming the file and
the layer.

Net steps, in Caffe's order (``UpgradeNetAsNeeded``), each only when its predicate holds:
  1. V0 -> V1   (nested V0 ``layer`` inside ``layers``): padding layers folded in, type strings -> enums,
                 V0 fields moved into their per-type sub-messages;
  2. data transform (V1 DATA/IMAGE_DATA/WINDOW_DATA with scale/mean_file/crop_size/mirror) -> transform_param;
  3. V1 -> V2   (``layers`` -> ``layer``): enum -> type string, blobs_lr/weight_decay/param/blob_share_mode
                 -> ParamSpec;
  4. ``input``/``input_shape``/``input_dim`` -> an ``Input`` layer at position 0 (only when shapes are given);
  5. BatchNorm layers with exactly three ParamSpecs get lr_mult = decay_mult = 0 on each.
"""
from __future__ import annotations

import dataclasses
import logging
import os

from .errors import ResnetcError
from .proto import caffe_pb2

__all__ = [
    "UpgradeReport", "upgrade_net", "upgrade_net_as_needed", "net_needs_upgrade",
    "net_needs_v0_upgrade", "net_needs_data_upgrade", "net_needs_v1_upgrade", "net_needs_input_upgrade",
    "net_needs_batchnorm_upgrade", "upgrade_solver", "upgrade_solver_as_needed", "solver_needs_upgrade",
    "upgrade_snapshot_prefix", "V0_LAYER_TYPES", "V1_LAYER_TYPES", "SOLVER_TYPES",
]

log = logging.getLogger("resnetc.upgrade")

V1 = caffe_pb2.V1LayerParameter

# UpgradeV0LayerType: V0 type string -> V1 enum. Anything else is FATAL ("Unknown layer name").
V0_LAYER_TYPES = {
    "accuracy": V1.ACCURACY, "bnll": V1.BNLL, "concat": V1.CONCAT, "conv": V1.CONVOLUTION,
    "data": V1.DATA, "dropout": V1.DROPOUT, "euclidean_loss": V1.EUCLIDEAN_LOSS, "flatten": V1.FLATTEN,
    "hdf5_data": V1.HDF5_DATA, "hdf5_output": V1.HDF5_OUTPUT, "im2col": V1.IM2COL, "images": V1.IMAGE_DATA,
    "infogain_loss": V1.INFOGAIN_LOSS, "innerproduct": V1.INNER_PRODUCT, "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS, "pool": V1.POOLING, "relu": V1.RELU,
    "sigmoid": V1.SIGMOID, "softmax": V1.SOFTMAX, "softmax_loss": V1.SOFTMAX_LOSS, "split": V1.SPLIT,
    "tanh": V1.TANH, "window_data": V1.WINDOW_DATA,
}

# UpgradeV1LayerType: V1 enum -> V2 type string.
V1_LAYER_TYPES = {
    V1.NONE: "", V1.ABSVAL: "AbsVal", V1.ACCURACY: "Accuracy", V1.ARGMAX: "ArgMax", V1.BNLL: "BNLL",
    V1.CONCAT: "Concat", V1.CONTRASTIVE_LOSS: "ContrastiveLoss", V1.CONVOLUTION: "Convolution",
    V1.DECONVOLUTION: "Deconvolution", V1.DATA: "Data", V1.DROPOUT: "Dropout", V1.DUMMY_DATA: "DummyData",
    V1.EUCLIDEAN_LOSS: "EuclideanLoss", V1.ELTWISE: "Eltwise", V1.EXP: "Exp", V1.FLATTEN: "Flatten",
    V1.HDF5_DATA: "HDF5Data", V1.HDF5_OUTPUT: "HDF5Output", V1.HINGE_LOSS: "HingeLoss", V1.IM2COL: "Im2col",
    V1.IMAGE_DATA: "ImageData", V1.INFOGAIN_LOSS: "InfogainLoss", V1.INNER_PRODUCT: "InnerProduct",
    V1.LRN: "LRN", V1.MEMORY_DATA: "MemoryData", V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss",
    V1.MVN: "MVN", V1.POOLING: "Pooling", V1.POWER: "Power", V1.RELU: "ReLU", V1.SIGMOID: "Sigmoid",
    V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss", V1.SILENCE: "Silence", V1.SOFTMAX: "Softmax",
    V1.SOFTMAX_LOSS: "SoftmaxWithLoss", V1.SPLIT: "Split", V1.SLICE: "Slice", V1.TANH: "TanH",
    V1.WINDOW_DATA: "WindowData", V1.THRESHOLD: "Threshold",
}

# UpgradeSolverType: solver_type enum -> type string.
_S = caffe_pb2.SolverParameter
SOLVER_TYPES = {_S.SGD: "SGD", _S.NESTEROV: "Nesterov", _S.ADAGRAD: "AdaGrad", _S.RMSPROP: "RMSProp",
                _S.ADADELTA: "AdaDelta", _S.ADAM: "Adam"}

# UpgradeV1LayerParameter copies these sub-messages verbatim (everything of a V1 layer but the V0 `layer`).
_V1_COPIED_PARAMS = (
    "accuracy_param", "argmax_param", "concat_param", "contrastive_loss_param", "convolution_param",
    "data_param", "dropout_param", "dummy_data_param", "eltwise_param", "exp_param", "hdf5_data_param",
    "hdf5_output_param", "hinge_loss_param", "image_data_param", "infogain_loss_param", "inner_product_param",
    "lrn_param", "memory_data_param", "mvn_param", "pooling_param", "power_param", "relu_param",
    "sigmoid_param", "softmax_param", "slice_param", "tanh_param", "threshold_param", "window_data_param",
    "transform_param", "loss_param",
)

_ANY_TYPE = "*"
_DATA_LIKE = ("data", "hdf5_data", "images", "window_data")

# UpgradeV0LayerParameter's field moves, in Caffe's order (the order of its ERROR lines):
# (V0 field, name used in Caffe's "Unknown parameter" message, {V0 type: "sub_param.field"}).
_V0_FIELD_MOVES = (
    ("num_output", "num_output", {"conv": "convolution_param.num_output",
                                  "innerproduct": "inner_product_param.num_output"}),
    ("biasterm", "biasterm", {"conv": "convolution_param.bias_term",
                              "innerproduct": "inner_product_param.bias_term"}),
    ("weight_filler", "weight_filler", {"conv": "convolution_param.weight_filler",
                                        "innerproduct": "inner_product_param.weight_filler"}),
    ("bias_filler", "bias_filler", {"conv": "convolution_param.bias_filler",
                                    "innerproduct": "inner_product_param.bias_filler"}),
    ("pad", "pad", {"conv": "convolution_param.pad", "pool": "pooling_param.pad"}),
    ("kernelsize", "kernelsize", {"conv": "convolution_param.kernel_size", "pool": "pooling_param.kernel_size"}),
    ("group", "group", {"conv": "convolution_param.group"}),
    ("stride", "stride", {"conv": "convolution_param.stride", "pool": "pooling_param.stride"}),
    ("pool", "pool", {"pool": "pooling_param.pool"}),  # V0 PoolMethod numbers == PoolingParameter's
    ("dropout_ratio", "dropout_ratio", {"dropout": "dropout_param.dropout_ratio"}),
    ("local_size", "local_size", {"lrn": "lrn_param.local_size"}),
    ("alpha", "alpha", {"lrn": "lrn_param.alpha"}),
    ("beta", "beta", {"lrn": "lrn_param.beta"}),
    ("k", "k", {"lrn": "lrn_param.k"}),
    ("source", "source", {"data": "data_param.source", "hdf5_data": "hdf5_data_param.source",
                          "images": "image_data_param.source", "window_data": "window_data_param.source",
                          "infogain_loss": "infogain_loss_param.source"}),
    ("scale", "scale", {_ANY_TYPE: "transform_param.scale"}),
    ("meanfile", "meanfile", {_ANY_TYPE: "transform_param.mean_file"}),
    ("batchsize", "batchsize", {"data": "data_param.batch_size", "hdf5_data": "hdf5_data_param.batch_size",
                                "images": "image_data_param.batch_size",
                                "window_data": "window_data_param.batch_size"}),
    ("cropsize", "cropsize", {_ANY_TYPE: "transform_param.crop_size"}),
    ("mirror", "mirror", {_ANY_TYPE: "transform_param.mirror"}),
    ("rand_skip", "rand_skip", {"data": "data_param.rand_skip", "images": "image_data_param.rand_skip"}),
    ("shuffle_images", "shuffle", {"images": "image_data_param.shuffle"}),
    ("new_height", "new_height", {"images": "image_data_param.new_height"}),
    ("new_width", "new_width", {"images": "image_data_param.new_width"}),
    ("concat_dim", "concat_dim", {"concat": "concat_param.concat_dim"}),
    ("det_fg_threshold", "det_fg_threshold", {"window_data": "window_data_param.fg_threshold"}),
    ("det_bg_threshold", "det_bg_threshold", {"window_data": "window_data_param.bg_threshold"}),
    ("det_fg_fraction", "det_fg_fraction", {"window_data": "window_data_param.fg_fraction"}),
    ("det_context_pad", "det_context_pad", {"window_data": "window_data_param.context_pad"}),
    ("det_crop_mode", "det_crop_mode", {"window_data": "window_data_param.crop_mode"}),
    ("hdf5_output_param", "hdf5_output_param", {"hdf5_output": "hdf5_output_param"}),
)

# NetNeedsDataUpgrade / UpgradeNetDataTransformation: V1 type -> its sub-param holding the old fields.
_DATA_TRANSFORM_PARAMS = {V1.DATA: "data_param", V1.IMAGE_DATA: "image_data_param",
                          V1.WINDOW_DATA: "window_data_param"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

_FUTURE_V0 = ("Note that future Caffe releases will not support V0NetParameter; use `resnetc upgrade` to "
              "upgrade this and any other net protos (prototxt and model weights) to the new format.")


@dataclasses.dataclass
class UpgradeReport:
    """What an upgrade did: the log records (level, message), whether any upgrade ran, and whether Caffe
    would call it fully successful (``False`` after a non-fatal problem such as a misplaced V0 field)."""

    records: list = dataclasses.field(default_factory=list)
    upgraded: bool = False
    success: bool = True

    @property
    def lines(self) -> list:
        return [msg for _, msg in self.records]

    def _emit(self, level: int, msg: str) -> None:
        self.records.append((level, msg))
        log.log(level, msg)

    def info(self, msg: str) -> None:
        self._emit(logging.INFO, msg)

    def warning(self, msg: str) -> None:
        self._emit(logging.WARNING, msg)

    def error(self, msg: str) -> None:
        self._emit(logging.ERROR, msg)


# --------------------------------------------------------------------------------------------------
# predicates

def net_needs_v0_upgrade(net) -> bool:
    """NetNeedsV0ToV1Upgrade: some ``layers`` entry holds a nested V0 ``layer``."""
    return any(entry.HasField("layer") for entry in net.layers)


def net_needs_data_upgrade(net) -> bool:
    """NetNeedsDataUpgrade: a V1 data layer keeps transformation fields in its own parameter."""
    for layer in net.layers:
        sub = _DATA_TRANSFORM_PARAMS.get(layer.type)
        if sub is not None and any(getattr(layer, sub).HasField(f) for f in _TRANSFORM_FIELDS):
            return True
    return False


def net_needs_v1_upgrade(net) -> bool:
    """NetNeedsV1ToV2Upgrade."""
    return len(net.layers) > 0


def net_needs_input_upgrade(net) -> bool:
    """NetNeedsInputUpgrade."""
    return len(net.input) > 0


def net_needs_batchnorm_upgrade(net) -> bool:
    """NetNeedsBatchNormUpgrade: a BatchNorm layer declares exactly three ParamSpecs."""
    return any(layer.type == "BatchNorm" and len(layer.param) == 3 for layer in net.layer)


def net_needs_upgrade(net) -> bool:
    """NetNeedsUpgrade (Caffe master): any of the five steps applies."""
    return (net_needs_v0_upgrade(net) or net_needs_v1_upgrade(net) or net_needs_data_upgrade(net)
            or net_needs_input_upgrade(net) or net_needs_batchnorm_upgrade(net))


def solver_needs_upgrade(solver) -> bool:
    """SolverNeedsTypeUpgrade."""
    return solver.HasField("solver_type")


# --------------------------------------------------------------------------------------------------
# the net pipeline

def upgrade_net(net, source: str, *, lines: dict | None = None) -> list:
    """Upgrade ``net`` (a NetParameter, text- or binary-born) in place; return the log lines emitted.

    ``lines`` ({layer name: line}) only serves error messages.
    """
    return upgrade_net_as_needed(net, source, lines=lines).lines


def upgrade_net_as_needed(net, source: str, *, lines: dict | None = None) -> UpgradeReport:
    """UpgradeNetAsNeeded: run each applicable step in Caffe's order; see the module docstring."""
    rep = UpgradeReport()
    where = _Where(source, lines)
    if net_needs_v0_upgrade(net):
        rep.upgraded = True
        rep.info(f"Attempting to upgrade input file specified using deprecated V0LayerParameter: {source}")
        if not _upgrade_v0_net(net, rep, where):
            rep.success = False
            rep.error("Warning: had one or more problems upgrading V0NetParameter to NetParameter "
                      "(see above); continuing anyway.")
        else:
            rep.info("Successfully upgraded file specified using deprecated V0LayerParameter")
        rep.warning(_FUTURE_V0)
    if net_needs_data_upgrade(net):
        rep.upgraded = True
        rep.info(f"Attempting to upgrade input file specified using deprecated transformation parameters: "
                 f"{source}")
        _upgrade_data_transformation(net)
        rep.info("Successfully upgraded file specified using deprecated data transformation parameters.")
        rep.warning("Note that future Caffe releases will only support transform_param messages for "
                    "transformation fields.")
    if net_needs_v1_upgrade(net):
        rep.upgraded = True
        rep.info(f"Attempting to upgrade input file specified using deprecated V1LayerParameter: {source}")
        if not _upgrade_v1_net(net, rep, where):
            rep.success = False
            rep.error("Warning: had one or more problems upgrading V1LayerParameter (see above); "
                      "continuing anyway.")
        else:
            rep.info("Successfully upgraded file specified using deprecated V1LayerParameter")
    if net_needs_input_upgrade(net):
        rep.upgraded = True
        rep.info(f"Attempting to upgrade input file specified using deprecated input fields: {source}")
        _upgrade_net_input(net, where)
        rep.info("Successfully upgraded file specified using deprecated input fields.")
        rep.warning("Note that future Caffe releases will only support input layers and not input fields.")
    if net_needs_batchnorm_upgrade(net):
        rep.upgraded = True
        rep.info(f"Attempting to upgrade batch norm layers using deprecated params: {source}")
        _upgrade_batchnorm(net)
        rep.info("Successfully upgraded batch norm layers using deprecated params.")
    return rep


class _Where:
    """File and layer-line lookup for FATAL errors."""

    def __init__(self, source: str, lines: dict | None):
        self.source = source
        self.lines = lines or {}

    def error(self, message: str, layer: str | None = None, layer_type: str | None = None) -> ResnetcError:
        return ResnetcError(message, file=self.source, line=self.lines.get(layer) if layer else None,
                            layer=layer, layer_type=layer_type)


def _layer_label(entry) -> str | None:
    """Name of a V1 ``layers`` entry (V0 keeps it inside the nested ``layer``)."""
    if entry.HasField("name"):
        return entry.name
    if entry.HasField("layer") and entry.layer.HasField("name"):
        return entry.layer.name
    return None


# ---- step 1: V0 -> V1 -------------------------------------------------------------------------------

def _upgrade_v0_net(net, rep: UpgradeReport, where: _Where) -> bool:
    """UpgradeV0Net: fold padding layers, upgrade each layer, keep only name/input/input_dim/force_backward."""
    entries = _fold_v0_padding_layers(net, where)
    upgraded = []
    fully_compatible = True
    for entry in entries:
        v1 = caffe_pb2.V1LayerParameter()
        fully_compatible &= _upgrade_v0_layer(entry, v1, rep, where)
        upgraded.append(v1)
    name = net.name if net.HasField("name") else None
    inputs = list(net.input)
    input_dims = list(net.input_dim)
    force_backward = net.force_backward if net.HasField("force_backward") else None
    net.Clear()
    if name is not None:
        net.name = name
    net.layers.extend(upgraded)
    net.input.extend(inputs)
    net.input_dim.extend(input_dims)
    if force_backward is not None:
        net.force_backward = force_backward
    return bool(fully_compatible)


def _fold_v0_padding_layers(net, where: _Where) -> list:
    """UpgradeV0PaddingLayers: drop V0 ``padding`` layers, giving their ``pad`` to the conv/pool layer that
    consumes them and rewiring that layer's bottom to the padding layer's input. Returns copies of the
    remaining ``layers`` entries."""
    out = []
    last_top = {name: -1 for name in net.input}  # blob -> index of the layer that last wrote it
    for i, entry in enumerate(net.layers):
        v0 = entry.layer
        kept = None
        if v0.type != "padding":
            kept = caffe_pb2.V1LayerParameter()
            kept.CopyFrom(entry)
            out.append(kept)
        for j, blob in enumerate(entry.bottom):
            if blob not in last_top:
                raise where.error(f"Unknown blob input {blob} to layer {j} (no earlier layer or net input "
                                  f"produces it)", _layer_label(entry), v0.type or None)
            src_idx = last_top[blob]
            if src_idx == -1:
                continue
            src = net.layers[src_idx]
            if src.layer.type != "padding":
                continue
            label = _layer_label(entry)
            if v0.type not in ("conv", "pool"):
                raise where.error(f"Padding layer input to non-convolutional / non-pooling layer type {v0.type}",
                                  label, v0.type or None)
            if len(entry.bottom) != 1:
                raise where.error(f"Conv Layer takes a single blob as input (got {len(entry.bottom)})",
                                  label, v0.type)
            if len(src.bottom) != 1:
                raise where.error(f"Padding Layer takes a single blob as input (got {len(src.bottom)})",
                                  _layer_label(src), "padding")
            if len(src.top) != 1:
                raise where.error(f"Padding Layer produces a single blob as output (got {len(src.top)})",
                                  _layer_label(src), "padding")
            kept.layer.pad = src.layer.pad
            kept.bottom[j] = src.bottom[0]
        for blob in entry.top:
            last_top[blob] = i
    return out


def _upgrade_v0_layer(entry, v1, rep: UpgradeReport, where: _Where) -> bool:
    """UpgradeV0LayerParameter: one V0 layer (inside its V1 connection) -> a V1LayerParameter."""
    v1.Clear()
    v1.bottom.extend(entry.bottom)
    v1.top.extend(entry.top)
    if not entry.HasField("layer"):
        return True
    v0 = entry.layer
    if v0.HasField("name"):
        v1.name = v0.name
    kind = v0.type
    if v0.HasField("type"):
        if kind not in V0_LAYER_TYPES:
            raise where.error(f"Unknown layer name: {kind} (not a V0 layer type; known: "
                              f"{', '.join(sorted(V0_LAYER_TYPES))})", v0.name if v0.HasField("name") else None,
                              kind)
        v1.type = V0_LAYER_TYPES[kind]
    v1.blobs.extend(v0.blobs)
    v1.blobs_lr.extend(v0.blobs_lr)
    v1.weight_decay.extend(v0.weight_decay)
    fully_compatible = True
    for field, caffe_name, dests in _V0_FIELD_MOVES:
        if not v0.HasField(field):
            continue
        dest = dests.get(_ANY_TYPE) or dests.get(kind)
        if dest is None:
            rep.error(f"Unknown parameter {caffe_name} for layer type {kind}")
            fully_compatible = False
            continue
        try:
            _assign(v1, dest, getattr(v0, field))
        except (ValueError, TypeError) as e:
            raise where.error(f"V0 field {field} cannot become {dest}: {e}",
                              v0.name if v0.HasField("name") else None, kind) from None
    return fully_compatible


def _assign(msg, dotted: str, value) -> None:
    """Set ``msg.a.b`` = value: appended when the field is repeated, copied when it is a message."""
    *path, last = dotted.split(".")
    for part in path:
        msg = getattr(msg, part)
    fd = msg.DESCRIPTOR.fields_by_name[last]
    if _is_repeated(fd):
        getattr(msg, last).append(value)
    elif fd.message_type is not None:
        getattr(msg, last).CopyFrom(value)
    else:
        setattr(msg, last, value)


def _is_repeated(fd) -> bool:
    is_rep = getattr(fd, "is_repeated", None)
    if is_rep is not None:
        return bool(is_rep)
    return fd.label == fd.LABEL_REPEATED


# ---- step 2: data transformation ------------------------------------------------------------------

def _upgrade_data_transformation(net) -> None:
    """UpgradeNetDataTransformation. Like Caffe's (which calls mutable_*), every V1 data layer of the three
    types gets its sub-param and transform_param present, even when nothing moves."""
    for layer in net.layers:
        sub_name = _DATA_TRANSFORM_PARAMS.get(layer.type)
        if sub_name is None:
            continue
        sub = getattr(layer, sub_name)
        sub.SetInParent()
        layer.transform_param.SetInParent()
        for f in _TRANSFORM_FIELDS:
            if sub.HasField(f):
                setattr(layer.transform_param, f, getattr(sub, f))
                sub.ClearField(f)


# ---- step 3: V1 -> V2 -----------------------------------------------------------------------------

def _upgrade_v1_net(net, rep: UpgradeReport, where: _Where) -> bool:
    """UpgradeV1Net: everything but ``layers`` kept; each ``layers`` entry becomes a ``layer``."""
    if len(net.layer) > 0:
        raise where.error("Refusing to upgrade inconsistent NetParameter input; the definition includes both "
                          "'layer' and 'layers' fields. The current format defines 'layer' fields with string "
                          "type like layer { type: 'Layer' ... } and not layers { type: LAYER ... }. Manually "
                          "switch the definition to 'layer' format to continue.")
    fully_compatible = True
    old = list(net.layers)
    new = []
    for i, v1 in enumerate(old):
        layer = caffe_pb2.LayerParameter()
        if not _upgrade_v1_layer(v1, layer, rep, where):
            rep.error(f"Upgrade of input layer {i} failed.")
            fully_compatible = False
        new.append(layer)
    net.ClearField("layers")
    net.layer.extend(new)
    return fully_compatible


def _upgrade_v1_layer(v1, layer, rep: UpgradeReport, where: _Where) -> bool:
    """UpgradeV1LayerParameter."""
    layer.Clear()
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        if v1.type not in V1_LAYER_TYPES:
            raise where.error(f"Unknown V1LayerParameter layer type: {v1.type}", _layer_label(v1))
        layer.type = V1_LAYER_TYPES[v1.type]
    layer.blobs.extend(v1.blobs)

    def spec(i: int):
        while len(layer.param) <= i:
            layer.param.add()
        return layer.param[i]

    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        # V1 DimCheckMode and ParamSpec.DimCheckMode share numbers (STRICT = 0, PERMISSIVE = 1)
        spec(i).share_mode = mode
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        spec(i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    for name in _V1_COPIED_PARAMS:
        if v1.HasField(name):
            getattr(layer, name).CopyFrom(getattr(v1, name))
    if v1.HasField("layer"):
        rep.error("Input NetParameter has V0 layer -- ignoring.")
        return False
    return True


# ---- step 4: input fields -> Input layer ----------------------------------------------------------

def _upgrade_net_input(net, where: _Where) -> None:
    """UpgradeNetInput. Only names without shapes (old caffemodels) just drop the fields."""
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    if has_shape or has_dim:
        n = len(net.input)
        if has_shape and len(net.input_shape) < n:
            raise where.error(f"{n} net inputs but only {len(net.input_shape)} input_shape entries "
                              f"(one per input is required)")
        if not has_shape and len(net.input_dim) < 4 * n:
            raise where.error(f"{n} net inputs need {4 * n} input_dim values (4 per input), got "
                              f"{len(net.input_dim)}")
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, blob in enumerate(net.input):
            layer.top.append(blob)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        net.layer.insert(0, layer)  # Caffe appends it, then swaps it down to position 0
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


# ---- step 5: BatchNorm --------------------------------------------------------------------------

def _upgrade_batchnorm(net) -> None:
    """UpgradeNetBatchNorm: the three ParamSpecs of an old BatchNorm get lr_mult = decay_mult = 0."""
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0


# --------------------------------------------------------------------------------------------------
# solver

def upgrade_solver(solver, source: str) -> list:
    """UpgradeSolverAsNeeded on ``solver`` in place; returns the log lines emitted."""
    return upgrade_solver_as_needed(solver, source).lines


def upgrade_solver_as_needed(solver, source: str) -> UpgradeReport:
    """UpgradeSolverAsNeeded: ``solver_type`` enum -> ``type`` string. Both set is an error (FATAL in Caffe).

    Like Caffe's, this does not touch nets embedded in the solver (``net_param`` etc.); they are upgraded
    when the net is read for training.
    """
    rep = UpgradeReport()
    if not solver_needs_upgrade(solver):
        return rep
    rep.upgraded = True
    rep.info(f"Attempting to upgrade input file specified using deprecated 'solver_type' field (enum)': "
             f"{source}")
    if solver.HasField("type"):
        raise ResnetcError("Failed to upgrade solver: old solver_type field (enum) and new type field (string) "
                           f"cannot be both specified in solver proto text (solver_type: "
                           f"{_S.SolverType.Name(solver.solver_type)}, type: \"{solver.type}\")", file=source)
    if solver.solver_type not in SOLVER_TYPES:
        raise ResnetcError(f"Unknown SolverParameter solver_type: {solver.solver_type}", file=source)
    solver.type = SOLVER_TYPES[solver.solver_type]
    solver.ClearField("solver_type")
    rep.info("Successfully upgraded file specified using deprecated 'solver_type' field (enum) to 'type' field "
             "(string).")
    rep.warning("Note that future Caffe releases will only support 'type' field (string) for a solver's type.")
    return rep


def upgrade_snapshot_prefix(solver, solver_path: str) -> list:
    """UpgradeSnapshotPrefixProperty (applied when a solver is read for training, not by the upgrade tool):
    an unset ``snapshot_prefix`` becomes the solver path without its extension; one naming an existing
    directory becomes ``<dir>/<solver file stem>``. Returns the log lines emitted."""
    solver_path = os.fspath(solver_path)
    if not solver.HasField("snapshot_prefix"):
        solver.snapshot_prefix = os.path.splitext(solver_path)[0]
        msg = f"snapshot_prefix was not specified and is set to {solver.snapshot_prefix}"
    elif os.path.isdir(solver.snapshot_prefix):
        stem = os.path.splitext(os.path.basename(solver_path))[0]
        solver.snapshot_prefix = os.path.join(solver.snapshot_prefix, stem)
        msg = f"snapshot_prefix is a directory and is set to {solver.snapshot_prefix}"
    else:
        return []
    log.info(msg)
    return [msg]


# --------------------------------------------------------------------------------------------------
# files (what `resnetc upgrade IN OUT` works on)

@dataclasses.dataclass
class LegacyFile:
    """A net or solver file as read for upgrading (not yet upgraded)."""

    path: str
    kind: str  # "net" or "solver"
    param: object  # NetParameter or SolverParameter
    binary: bool = False
    lines: dict = dataclasses.field(default_factory=dict)  # layer name -> line (text nets)


def read_legacy_file(path) -> LegacyFile:
    """Read ``path`` as a NetParameter or a SolverParameter, whichever it is.

    Binary files are NetParameters (.caffemodel). A text file is parsed as both; the one that parses wins.
    When both parse (only comments, ``debug_info`` or nothing), a file named like ``*solver*`` is a solver,
    anything else a net. When neither parses, the error of the parse that got further into the file is
    reported (a net with a typo fails late as a net but at its first line as a solver, and vice versa).
    """
    from . import prototxt

    path = os.fspath(path)
    data = _read_bytes(path)
    if _looks_binary(data):
        return LegacyFile(path, "net", prototxt.read_binary(path, caffe_pb2.NetParameter, data=data), binary=True)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ResnetcError(f"not a text proto and not a binary one: byte {e.start} is not UTF-8", file=path) from None
    results = {}
    for kind, parse in (("net", prototxt.parse_net_text), ("solver", prototxt.parse_solver_text)):
        try:
            results[kind] = parse(text, path, upgrade=False)
        except ResnetcError as e:
            results[kind] = e
    net, solver = results["net"], results["solver"]
    net_ok, solver_ok = not isinstance(net, ResnetcError), not isinstance(solver, ResnetcError)
    if net_ok and solver_ok:
        if "solver" in os.path.basename(path).lower():
            return LegacyFile(path, "solver", solver)
        return LegacyFile(path, "net", net.param, lines=net.lines)
    if net_ok:
        return LegacyFile(path, "net", net.param, lines=net.lines)
    if solver_ok:
        return LegacyFile(path, "solver", solver)
    net_at = (net.line or 0, net.col or 0)
    solver_at = (solver.line or 0, solver.col or 0)
    raise solver if solver_at > net_at else net


def upgrade_legacy(src: LegacyFile) -> UpgradeReport:
    """Upgrade a file read by :func:`read_legacy_file` in place (its ``param``)."""
    if src.kind == "solver":
        return upgrade_solver_as_needed(src.param, src.path)
    return upgrade_net_as_needed(src.param, src.path, lines=src.lines)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ResnetcError("no such file", file=path) from None
    except IsADirectoryError:
        raise ResnetcError("is a directory, expected a file", file=path) from None
    except OSError as e:
        raise ResnetcError(f"cannot read: {e.strerror}", file=path) from None


def _looks_binary(data: bytes) -> bool:
    """Wire format, not text: not UTF-8, or control characters other than whitespace near the start."""
    if not data:
        return False
    try:
        head = data[:4096].decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start >= len(data[:4096]) - 3:  # a multi-byte character cut at the 4096-byte boundary
            head = data[:e.start].decode("utf-8")
        else:
            return True
    return any(ord(c) < 9 or 13 < ord(c) < 32 for c in head)
