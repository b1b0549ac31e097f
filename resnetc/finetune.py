"""Fine-tuning: Caffe's ``examples/finetune_flickr_style`` workflow as one command.

Load a pretrained net, give it a new classifier, freeze or slow down its early layers, train::

    resnetc finetune BASE.prototxt --weights BASE.caffemodel --num-classes N --data lmdb:TRAIN,TEST \\
        [--freeze-until LAYER] [--lr-mult-backbone 0.1] -o DIR
    resnetc train DIR/solver.prototxt

``BASE`` is a train_val (its data layers are re-pointed at ``--data``, keeping their ``transform_param`` and batch
sizes) or a deploy net (its ``Input`` becomes TRAIN/TEST ``Data`` layers with the transform given on the command
line, its final ``Softmax`` a ``SoftmaxWithLoss`` + TEST ``Accuracy``). What is written:

* ``DIR/train_val.prototxt``. **The classifier** (the last InnerProduct or Convolution feeding the softmax loss,
  reached back through parameter-free single-input layers such as ReLU, Pooling, Flatten, Dropout; auxiliary
  classifiers such as GoogLeNet's are treated alike) is **renamed** ``<name>_ft`` (or ``--classifier-name``), so
  that the pretrained weights, copied by layer name, leave it to its fillers (Gaussian std 0.01 and constant 0
  when the base gives none, as in the flickr example); ``num_output`` = N; its top blob is renamed with it when it
  bears the layer's name. It learns ``--lr-mult-head`` times faster (weights; biases twice that, without decay:
  Caffe's ``lr_mult: 10`` / ``20``). ``--freeze-until LAYER`` gives every parameter blob of the layers up to and
  including ``LAYER`` (file order) ``lr_mult: 0`` and ``decay_mult: 0``; a frozen ``BatchNorm`` gets
  ``use_global_stats: true`` instead: Caffe never learns its statistics by gradient (it masks them itself; three
  ``param`` specs on it are the deprecated form), it updates their moving averages from every TRAIN batch, so only
  stored statistics keep a frozen BatchNorm unchanged. Frozen layers are therefore bit-identical after training.
  Not-frozen BatchNorm layers use batch statistics in TRAIN (Caffe's default; a deploy BASE's
  ``use_global_stats: true`` is removed from them) and, in TEST, moving averages that start from the pretrained
  ones (``moving_average_fraction`` 0.999: for a few hundred iterations they still mostly describe the old data).
  ``--lr-mult-backbone F`` multiplies the ``lr_mult`` of every other learnable blob (BatchNorm statistics
  excepted).
* ``DIR/solver.prototxt``: ``net``, ``weights: BASE.caffemodel`` (so ``resnetc train DIR/solver.prototxt``
  fine-tunes; Caffe's ``-weights`` flag does the same), the schedule (defaults: the flickr example's SGD, base_lr
  0.001, step 0.1 every 20,000, momentum 0.9, weight decay 5e-4), ``test_iter`` covering the test LMDB once, and
  the ``resnetc`` extension ``early_stop_output``/``early_stop_patience`` with ``--early-stop OUTPUT:PATIENCE``.
  Paths are written as given: run ``resnetc train`` from the directory ``finetune`` ran in, as with Caffe. Give
  ``--seed`` another value than the pretraining's: the fillers draw in layer order, so the same seed refills the
  new classifier with exactly the initial weights of the one it replaces.
* ``DIR/deploy.prototxt``: the inference net with the new classifier (Input → ``prob``).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import os
from typing import Optional

from .errors import ResnetcError
from .graph import build_graph, filter_layers, make_state
from .proto import caffe_pb2
from .prototxt import NetSource, read_net, to_text

log = logging.getLogger("resnetc.finetune")

HEAD_LR_MULT = 10.0  # flickr_style's fc8_flickr: weights lr_mult 10, bias 20
CLASSIFIER_TYPES = ("InnerProduct", "Convolution")
PREDICTION_TYPES = ("SoftmaxWithLoss", "Accuracy", "Softmax")
PASS_THROUGH = ("ReLU", "PReLU", "Pooling", "Flatten", "Reshape", "Dropout", "TanH", "Sigmoid", "ELU", "Power")
FILES = ("train_val.prototxt", "solver.prototxt", "deploy.prototxt")
SNAPSHOT_STEM = "finetune"


@dataclasses.dataclass
class Transform:
    """Overrides of the Data layers' transform_param (None: keep the base's, or Caffe's default)."""

    mean_file: Optional[str] = None
    mean_value: tuple = ()
    scale: Optional[float] = None
    crop_size: Optional[int] = None
    mirror: Optional[bool] = None  # TRAIN only; TEST never mirrors


@dataclasses.dataclass
class SolverOptions:
    base_lr: float = 0.001
    lr_policy: str = "step"
    gamma: float = 0.1
    stepsize: int = 20000
    max_iter: int = 100000
    momentum: float = 0.9
    weight_decay: float = 0.0005
    display: int = 20
    test_interval: int = 1000
    test_iter: Optional[int] = None  # None: one pass over the test LMDB
    snapshot: int = 10000
    seed: Optional[int] = None
    type: str = "SGD"
    early_stop: Optional[str] = None  # "OUTPUT:PATIENCE[:max|min]"


@dataclasses.dataclass
class FinetuneOptions:
    num_classes: int
    weights: str
    data: Optional[tuple] = None  # (train LMDB, test LMDB)
    freeze_until: Optional[str] = None
    lr_mult_backbone: float = 1.0
    lr_mult_head: float = HEAD_LR_MULT
    classifier_name: Optional[str] = None
    transform: Transform = dataclasses.field(default_factory=Transform)
    batch_size: Optional[int] = None
    test_batch_size: Optional[int] = None
    input_shapes: dict = dataclasses.field(default_factory=dict)
    solver: SolverOptions = dataclasses.field(default_factory=SolverOptions)


@dataclasses.dataclass
class FinetunePlan:
    train_val: caffe_pb2.NetParameter
    deploy: caffe_pb2.NetParameter
    solver: caffe_pb2.SolverParameter
    classifiers: list  # [(old name, new name)], the main one first
    frozen: list  # names of the layers whose parameters are frozen
    scaled: list  # names of the layers whose lr_mult was multiplied by --lr-mult-backbone
    base: str
    base_is_deploy: bool
    paths: dict  # {"train_val"|"solver"|"deploy": path}

    def texts(self) -> dict:
        """{path: text} of the three files."""
        (old, new), n = self.classifiers[0], _num_output(_layer(self.train_val, self.classifiers[0][1]))
        what = f"classifier {old} -> {new} ({n} outputs)"
        head = f"# Fine-tuning {self.base}: {what}. Written by `resnetc finetune`.\n"
        return {self.paths["train_val"]: head + to_text(self.train_val),
                self.paths["solver"]: head + to_text(self.solver),
                self.paths["deploy"]: head + to_text(self.deploy)}


# ----------------------------------------------------------------------------------------------------------
# small helpers


def _err(msg: str, src: Optional[NetSource] = None, lp=None) -> ResnetcError:
    if src is None:
        return ResnetcError(msg)
    return ResnetcError(msg, file=src.file, line=src.line_of(lp.name) if lp is not None else None,
                        layer=lp.name if lp is not None else None, layer_type=lp.type if lp is not None else None)


def _layer(net, name):
    for lp in net.layer:
        if lp.name == name:
            return lp
    raise KeyError(name)


def _type_param(lp):
    return lp.inner_product_param if lp.type == "InnerProduct" else lp.convolution_param


def _num_output(lp) -> int:
    return int(_type_param(lp).num_output)


def _is_data(lp) -> bool:
    from .layers import registry

    spec = registry.get(lp.type)
    return bool(spec is not None and spec.data)


def _has_params(lp) -> bool:
    from .layers import registry

    spec = registry.get(lp.type)
    return bool(spec is not None and spec.params)


def _phases(lp) -> list:
    """The phases a layer's include rules name (both when it has none)."""
    named = [r.phase for r in lp.include if r.HasField("phase")]
    return sorted(set(named)) if named else [caffe_pb2.TRAIN, caffe_pb2.TEST]


def _unique(name: str, taken: set) -> str:
    out, k = name, 1
    while out in taken:
        k += 1
        out = f"{name}{k}"
    return out


def parse_early_stop(value: str) -> tuple:
    """``OUTPUT:PATIENCE[:max|min]`` -> (output, patience, mode); mode max unless told (loss:3:min)."""
    parts = value.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise ResnetcError(f"--early-stop wants OUTPUT:PATIENCE[:max|min] (e.g. accuracy:5 or loss:3:min), got "
                           f"'{value}'")
    try:
        patience = int(parts[1])
    except ValueError:
        raise ResnetcError(f"--early-stop: patience '{parts[1]}' is not an integer") from None
    if patience < 1:
        raise ResnetcError(f"--early-stop: patience must be >= 1 test passes (got {patience})")
    mode = parts[2].strip().lower() if len(parts) == 3 else "max"  # as `resnetc train --early-stop`
    if mode not in ("max", "min"):
        raise ResnetcError(f"--early-stop: mode must be max or min (got '{mode}')")
    return parts[0], patience, mode


# ----------------------------------------------------------------------------------------------------------
# data: a deploy's Input, or a train_val's data layers, become Data layers reading --data


def _transform(base: Optional[caffe_pb2.TransformationParameter], t: Transform, train: bool):
    tp = caffe_pb2.TransformationParameter()
    if base is not None:
        tp.CopyFrom(base)
    if t.mean_file is not None:
        tp.ClearField("mean_value")
        tp.mean_file = t.mean_file
    if t.mean_value:
        tp.ClearField("mean_file")
        del tp.mean_value[:]
        tp.mean_value.extend(t.mean_value)
    if t.scale is not None:
        tp.scale = t.scale
    if t.crop_size is not None:
        tp.crop_size = t.crop_size
    if not train:
        if tp.mirror:
            tp.mirror = False
        tp.ClearField("resnetc_augment")
    elif t.mirror is not None:
        tp.mirror = t.mirror
    return tp


def _data_layer(name, tops, phase, source, batch, tp) -> caffe_pb2.LayerParameter:
    lp = caffe_pb2.LayerParameter(name=name, type="Data")
    lp.top.extend(tops)
    lp.include.add().phase = phase
    if tp is not None and tp.ListFields():
        lp.transform_param.CopyFrom(tp)
    lp.data_param.source = source
    lp.data_param.batch_size = int(batch)
    lp.data_param.backend = caffe_pb2.DataParameter.LMDB
    return lp


def _batch_of(lp) -> Optional[int]:
    for field in ("data_param", "image_data_param", "hdf5_data_param", "memory_data_param", "window_data_param"):
        if lp.HasField(field) and getattr(lp, field).batch_size:
            return int(getattr(lp, field).batch_size)
    if lp.type == "Input" and lp.input_param.shape and lp.input_param.shape[0].dim:
        return int(lp.input_param.shape[0].dim[0])
    return None


def _first_datum_hw(source: str) -> Optional[tuple]:
    """(C, H, W) of the first record of an LMDB, or None when it cannot be read now."""
    from .data.datum import datum_to_array, parse_datum
    from .data.db import DBReader

    try:
        with DBReader(source) as db:
            key, value = db.first()
            return tuple(datum_to_array(parse_datum(value, source, key), source, key).shape)
    except (ResnetcError, OSError):
        return None


def _db_count(source: str) -> Optional[int]:
    from .data.db import DBReader

    try:
        with DBReader(source) as db:
            return len(db)
    except (ResnetcError, OSError):
        return None


def _deploy_to_train_val(net, src: NetSource, opts: FinetuneOptions) -> None:
    """In place: a deploy's Input → TRAIN/TEST Data layers; its final Softmax → SoftmaxWithLoss + Accuracy."""
    inputs = [lp for lp in net.layer if lp.type == "Input"]
    if len(inputs) != 1 or len(inputs[0].top) != 1:
        what = "no Input layer" if not inputs else "several inputs"
        raise _err(f"a deploy BASE needs exactly one Input blob (the images) to turn into Data layers; it has {what}",
                   src)
    inp = inputs[0]
    data_top = inp.top[0]
    shape = list(inp.input_param.shape[0].dim) if inp.input_param.shape else []
    blobs = {b for lp in net.layer for b in list(lp.top) + list(lp.bottom)}
    names = {lp.name for lp in net.layer}
    label = _unique("label", blobs)
    t = dataclasses.replace(opts.transform)
    if t.crop_size is None and len(shape) == 4 and shape[2] == shape[3]:
        chw = _first_datum_hw(opts.data[0])
        if chw is not None and chw[1] > shape[2] and chw[2] > shape[3]:
            t.crop_size = int(shape[2])
            log.info("the deploy takes %dx%d images and %s holds %dx%d ones: crop_size %d", shape[2], shape[3],
                     opts.data[0], chw[1], chw[2], t.crop_size)
    name = "data" if "data" not in names - {inp.name} else inp.name
    train = _data_layer(name, [data_top, label], caffe_pb2.TRAIN, opts.data[0], opts.batch_size or 32,
                        _transform(None, t, True))
    test = _data_layer(name, [data_top, label], caffe_pb2.TEST, opts.data[1], opts.test_batch_size or 50,
                       _transform(None, t, False))
    consumed = {b for lp in net.layer for b in lp.bottom if b not in lp.top}
    softmaxes = [lp for lp in net.layer if lp.type == "Softmax" and lp.top and lp.top[0] not in consumed]
    layers = []
    for lp in net.layer:
        if lp is inp:
            layers.extend([train, test])
        elif softmaxes and lp is softmaxes[-1]:
            continue
        else:
            layers.append(lp)
    if softmaxes:
        sm = softmaxes[-1]
        logits, axis = sm.bottom[0], (sm.softmax_param if sm.HasField("softmax_param") else None)
    else:
        last = [lp for lp in layers if lp.top and not _is_data(lp)]
        if not last:
            raise _err("no classifier found: the deploy BASE has no layers after its input", src)
        logits, axis = last[-1].top[0], None
    taken = {lp.name for lp in layers} | blobs
    loss = caffe_pb2.LayerParameter(name=_unique("loss", taken), type="SoftmaxWithLoss")
    loss.bottom.extend([logits, label])
    loss.top.append(loss.name)
    acc = caffe_pb2.LayerParameter(name=_unique("accuracy", taken), type="Accuracy")
    acc.bottom.extend([logits, label])
    acc.top.append(acc.name)
    acc.include.add().phase = caffe_pb2.TEST
    if axis is not None:
        loss.softmax_param.CopyFrom(axis)
        if axis.HasField("axis"):
            acc.accuracy_param.axis = axis.axis
    layers.extend([loss, acc])
    for lp in layers:
        if lp.type == "BatchNorm" and lp.batch_norm_param.HasField("use_global_stats"):
            lp.batch_norm_param.ClearField("use_global_stats")  # learn the statistics unless frozen
            if not lp.batch_norm_param.ListFields():
                lp.ClearField("batch_norm_param")
    copies = [copy.deepcopy(lp) for lp in layers]
    del net.layer[:]
    net.layer.extend(copies)


def _repoint_data(net, src: NetSource, opts: FinetuneOptions) -> None:
    """In place: the train_val's data layers (or an Input giving data + label) read --data's LMDBs."""
    providers = [lp for lp in net.layer if _is_data(lp)]
    if not providers:
        providers = [lp for lp in net.layer if lp.type == "Input" and len(lp.top) >= 2]
        if not providers:
            raise _err("BASE has a loss but no data layers and no Input layer giving both images and labels: "
                       "nothing to read --data into", src)
    layers = []
    for lp in net.layer:
        if lp not in providers:
            layers.append(lp)
            continue
        if len(lp.top) < 2:
            raise _err("this data layer gives no labels: a classifier is fine-tuned from Data layers with two tops "
                       "(images, labels)", src, lp)
        tops = list(lp.top[:2])
        batch = _batch_of(lp)
        base_tp = lp.transform_param if lp.HasField("transform_param") else None
        for phase in _phases(lp):
            train = phase == caffe_pb2.TRAIN
            size = (opts.batch_size if train else opts.test_batch_size) or batch or (32 if train else 50)
            new = _data_layer(lp.name if lp.type != "Input" else "data", tops, phase,
                              opts.data[0] if train else opts.data[1], size, _transform(base_tp, opts.transform,
                                                                                         train))
            for rule in lp.include:  # keep the rules' stages and levels
                if not rule.HasField("phase") or rule.phase == phase:
                    new.include[0].MergeFrom(rule)
                    new.include[0].phase = phase
                    break
            layers.append(new)
    copies = [copy.deepcopy(lp) for lp in layers]
    del net.layer[:]
    net.layer.extend(copies)


def _override_transforms(net, t: Transform) -> None:
    """--mean-file/--scale/... on data layers kept from a train_val BASE (no --data)."""
    if t == Transform():
        return
    for lp in net.layer:
        if _is_data(lp) and lp.type != "HDF5Data":
            lp.transform_param.CopyFrom(_transform(lp.transform_param, t, _phases(lp) == [caffe_pb2.TRAIN]))


# ----------------------------------------------------------------------------------------------------------
# the classifier


def _walk_to_classifier(kept: list, pos: int, blob: str, counts: dict):
    """The InnerProduct/Convolution whose output reaches ``blob`` (read at position ``pos``) through
    parameter-free single-input layers; (layer, None) or (None, why)."""
    i = pos
    while True:
        producer = None
        for j in range(i - 1, -1, -1):
            if blob in kept[j].top:
                producer, i = kept[j], j
                break
        if producer is None:
            return None, f"no layer before it makes '{blob}'"
        if producer.type in CLASSIFIER_TYPES:
            return producer, None
        if (producer.type not in PASS_THROUGH and _has_params(producer)) or len(producer.bottom) != 1 or \
                counts.get(producer.name):
            return None, (f"its input comes from '{producer.name}' ({producer.type}), not from an InnerProduct or "
                          f"Convolution")
        blob = producer.bottom[0]


def _find_classifiers(net, src: NetSource, counts: dict) -> list:
    """Names of the classifier layers, the main one (feeding the loss of largest weight) first."""
    from .deploy import _main_loss

    found, main = [], None
    for phase in ("TRAIN", "TEST"):
        kept = filter_layers(NetSource(param=net), make_state(net, phase))
        if phase == "TRAIN":
            loss = _main_loss(kept)
            if loss is None or loss.type not in ("SoftmaxWithLoss", "Accuracy"):
                what = f"its main loss '{loss.name}' is a {loss.type}" if loss is not None else "it has no loss"
                raise _err(f"no classifier found: fine-tuning needs a SoftmaxWithLoss (or a deploy's Softmax) "
                           f"fed by an InnerProduct or Convolution; {what}", src)
            pos = kept.index(loss)
            layer, why = _walk_to_classifier(kept, pos, loss.bottom[0], counts)
            if layer is None:
                raise _err(f"no classifier found: {why}", src, loss)
            main = layer.name
        for pos, lp in enumerate(kept):
            if lp.type in PREDICTION_TYPES and lp.bottom:
                layer, _ = _walk_to_classifier(kept, pos, lp.bottom[0], counts)
                if layer is not None and layer.name not in found:
                    found.append(layer.name)
    return [main] + [n for n in found if n != main]


def _rename_classifiers(net, classifiers: list, opts: FinetuneOptions, src: NetSource) -> list:
    """In place: rename, resize and re-initialise the classifiers; returns [(old, new)]."""
    names = {lp.name for lp in net.layer}
    blobs = {b for lp in net.layer for b in list(lp.top) + list(lp.bottom)}
    out = []
    for k, old in enumerate(classifiers):
        new = opts.classifier_name if (k == 0 and opts.classifier_name) else f"{old}_ft"
        if new in names or new in blobs:
            raise _err(f"the new classifier name '{new}' is already a layer or blob of BASE: choose another with "
                       f"--classifier-name", src)
        _rename_in(net, old, new)
        names.add(new)
        blobs.add(new)
        out.append((old, new))
    return out


def _rename_in(net, old: str, new: str, *, num_output: Optional[int] = None) -> None:
    """Rename layer ``old`` to ``new`` in every phase; its top blob too when it bears the layer's name."""
    rename_blob = False
    for lp in net.layer:
        if lp.name == old and lp.type in CLASSIFIER_TYPES:
            lp.name = new
            if lp.top and lp.top[0] == old:
                rename_blob = True
            if num_output is not None:
                _type_param(lp).num_output = num_output
    if rename_blob:
        for lp in net.layer:
            for field in (lp.bottom, lp.top):
                for i, b in enumerate(field):
                    if b == old:
                        field[i] = new


def _init_classifier(lp, n: int, head: float, count: int) -> None:
    p = _type_param(lp)
    p.num_output = n
    if not p.HasField("weight_filler"):
        p.weight_filler.type = "gaussian"
        p.weight_filler.std = 0.01
    if p.bias_term and not p.HasField("bias_filler"):
        p.bias_filler.type = "constant"
        p.bias_filler.value = 0
    specs = list(lp.param)
    del lp.param[:]
    for i in range(count):
        s = lp.param.add()
        if i < len(specs):
            s.CopyFrom(specs[i])
        s.lr_mult = head * (1 if i == 0 else 2)
        s.decay_mult = 1 if i == 0 else 0


# ----------------------------------------------------------------------------------------------------------
# parameter counts: from the built graphs, else from the weights file, else from the classifier's own params


def _shapes_for(net, phase: str, input_shapes: dict) -> dict:
    """--input-shape for one phase's graph: the batch axis is each data layer's own batch size."""
    out = dict(input_shapes or {})
    if not out:
        return out
    for lp in filter_layers(NetSource(param=net), make_state(net, phase)):
        batch = _batch_of(lp) if _is_data(lp) else None
        for t in lp.top:
            if batch and t in out and len(out[t]):
                out[t] = (batch,) + tuple(out[t][1:])
    return out


def _param_counts(nets: list, input_shapes: dict, wf) -> dict:
    counts = {}
    for src in nets:
        for phase in ("TRAIN", "TEST"):
            try:
                graph = build_graph(src, phase, input_shapes=_shapes_for(src.param, phase, input_shapes))
            except ResnetcError:
                if src is nets[0]:
                    raise
                continue
            for layer in graph.layers:
                if layer.blobs is not None and layer.name not in counts and not layer.inserted:
                    counts[layer.name] = len(layer.blobs)
    for sl in wf.layers:
        counts.setdefault(sl.name, len(sl.blobs))
    return counts


def _count(lp, counts: dict, wf_path: str) -> int:
    if not _has_params(lp):
        return 0
    if lp.name in counts:
        return counts[lp.name]
    if lp.type in CLASSIFIER_TYPES:
        return 2 if _type_param(lp).bias_term else 1
    raise ResnetcError(f"cannot tell how many parameter blobs this layer has: its input sizes are unknown (data "
                       f"source not available) and {wf_path} has no weights for it; create the LMDBs first or give "
                       f"--input-shape", layer=lp.name, layer_type=lp.type)


# ----------------------------------------------------------------------------------------------------------
# the plan


def plan_finetune(base: str, opts: FinetuneOptions, out_dir: str) -> FinetunePlan:
    """Everything ``resnetc finetune`` writes, computed and validated (nothing written)."""
    if opts.num_classes < 1:
        raise ResnetcError(f"--num-classes must be >= 1 (got {opts.num_classes})")
    if opts.lr_mult_backbone < 0 or opts.lr_mult_head < 0:
        raise ResnetcError("--lr-mult-backbone and --lr-mult-head must be >= 0")
    if not os.path.exists(opts.weights):
        raise ResnetcError("--weights: no such file", file=opts.weights)
    early = parse_early_stop(opts.solver.early_stop) if opts.solver.early_stop else None
    from .deploy import is_deploy, to_deploy  # torch comes with these: after the checks that need none
    from .weights import read_weights

    src = read_net(base)
    wf = read_weights(opts.weights)
    base_is_deploy = is_deploy(src)
    net = caffe_pb2.NetParameter()
    net.CopyFrom(src.param)
    if base_is_deploy:
        if opts.data is None:
            raise _err("BASE is a deploy net (no data layers, no loss): give --data lmdb:TRAIN_DB,TEST_DB", src)
        _deploy_to_train_val(net, src, opts)
    elif opts.data is not None:
        _repoint_data(net, src, opts)
    else:
        log.info("no --data: the train_val keeps BASE's data layers")
        _override_transforms(net, opts.transform)
    new_src = NetSource(param=net, file=None)
    counts = _param_counts([new_src, src], opts.input_shapes, wf)
    classifiers = _find_classifiers(net, src, counts)
    renamed = _rename_classifiers(net, classifiers, opts, src)
    new_names = {new for _, new in renamed}
    order = [lp.name for lp in net.layer]
    for lp in net.layer:
        if lp.name in new_names:
            _init_classifier(lp, opts.num_classes, opts.lr_mult_head, 2 if _type_param(lp).bias_term else 1)
    # -- freeze ------------------------------------------------------------------------------------------
    frozen = []
    if opts.freeze_until:
        target = opts.freeze_until
        if target not in order:
            old_names = dict(renamed)
            if target in old_names:
                raise _err(f"--freeze-until '{target}' names the classifier, which is replaced by the new "
                           f"'{old_names[target]}': name a layer before it", src)
            close = difflib.get_close_matches(target, order, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _err(f"--freeze-until: no layer '{target}' in BASE{hint}", src)
        last = max(i for i, n in enumerate(order) if n == target)
        main_pos = order.index(renamed[0][1])
        if last >= main_pos:
            raise _err(f"--freeze-until '{target}' comes at or after the classifier '{renamed[0][1]}': the new "
                       f"classifier cannot be frozen; name a layer before it", src)
        for lp in net.layer[:last + 1]:
            if lp.name in new_names:
                continue
            n = _count(lp, counts, opts.weights)
            if not n:
                continue
            if lp.type == "BatchNorm":
                # Caffe never learns BatchNorm statistics by gradient (param specs on it are the deprecated
                # form); what keeps them fixed in TRAIN is using the stored ones
                lp.batch_norm_param.use_global_stats = True
            else:
                specs = list(lp.param)
                del lp.param[:]
                for i in range(n):
                    s = lp.param.add()
                    if i < len(specs):
                        s.CopyFrom(specs[i])
                    s.lr_mult = 0
                    s.decay_mult = 0
            if lp.name not in frozen:
                frozen.append(lp.name)
        in_file = {sl.name for sl in wf.layers}
        missing = [n for n in frozen if n not in in_file]
        if missing:
            raise ResnetcError(f"--freeze-until {target}: layer '{missing[0]}' would stay frozen at its random "
                               f"initialisation: {opts.weights} has no weights for it", file=opts.weights)
    # -- slower backbone -----------------------------------------------------------------------------------
    scaled = []
    if opts.lr_mult_backbone != 1:
        frozen_set = set(frozen)
        for lp in net.layer:
            if lp.name in new_names or lp.name in frozen_set or lp.type == "BatchNorm":
                continue
            n = _count(lp, counts, opts.weights)
            if not n:
                continue
            specs = list(lp.param)
            del lp.param[:]
            for i in range(n):
                s = lp.param.add()
                if i < len(specs):
                    s.CopyFrom(specs[i])
                s.lr_mult = (specs[i].lr_mult if i < len(specs) and specs[i].HasField("lr_mult") else 1.0) * \
                    opts.lr_mult_backbone
            if lp.name not in scaled:
                scaled.append(lp.name)
    _check_sharing(net, set(frozen), src)
    # -- validate the train_val as `resnetc check` does ------------------------------------------------------
    train_val_path = os.path.join(out_dir, FILES[0])
    checked = NetSource(param=net, file=train_val_path)
    train_graph = build_graph(checked, "TRAIN", input_shapes=_shapes_for(net, "TRAIN", opts.input_shapes))
    test_graph = build_graph(checked, "TEST", input_shapes=_shapes_for(net, "TEST", opts.input_shapes))
    if train_graph.shapes_known:
        _check_weights_fit(train_graph, wf)
    # -- deploy ---------------------------------------------------------------------------------------------
    if base_is_deploy:
        deploy = caffe_pb2.NetParameter()
        deploy.CopyFrom(src.param)
        for old, new in renamed:
            _rename_in(deploy, old, new, num_output=opts.num_classes)
    else:
        deploy = to_deploy(checked, batch=1, input_shapes=opts.input_shapes).param
        for lp in deploy.layer:  # learning rates mean nothing at inference (shared names are kept)
            if all(not s.name for s in lp.param):
                lp.ClearField("param")
    build_graph(NetSource(param=deploy, file=os.path.join(out_dir, FILES[2])), "TEST")
    # -- solver ----------------------------------------------------------------------------------------------
    solver = _solver(net, test_graph, opts, out_dir, early)
    (old, new) = renamed[0]
    log.info("classifier %s -> %s: %d outputs, lr_mult %g/%g", old, new, opts.num_classes, opts.lr_mult_head,
             2 * opts.lr_mult_head)
    if frozen:
        log.info("frozen (lr_mult 0, BatchNorm on stored statistics): %d layers, %s ... %s", len(frozen), frozen[0],
                 frozen[-1])
    if scaled:
        log.info("lr_mult x %g: %d layers, %s ... %s", opts.lr_mult_backbone, len(scaled), scaled[0], scaled[-1])
    paths = {"train_val": train_val_path, "solver": os.path.join(out_dir, FILES[1]),
             "deploy": os.path.join(out_dir, FILES[2])}
    return FinetunePlan(train_val=net, deploy=deploy, solver=solver, classifiers=renamed, frozen=frozen,
                        scaled=scaled, base=base, base_is_deploy=base_is_deploy, paths=paths)


class _Shape:
    def __init__(self, shape):
        self.shape = tuple(shape)


def _check_weights_fit(graph, wf) -> None:
    """The copy ``resnetc train`` will make, checked now: e.g. 3-channel weights for 1-channel data fail here,
    with the layer and both shapes, instead of after the solver is built."""
    from .weights import _plan

    params = {layer.name: [_Shape(b.shape) for b in layer.blobs] for layer in graph.layers if layer.blobs}
    _plan(graph, params, wf, strict_shapes=True)


def _check_sharing(net, frozen: set, src: NetSource) -> None:
    """A parameter shared (``param { name }``) between a frozen and a learning layer cannot be both."""
    owner = {}
    for lp in net.layer:
        for s in lp.param:
            if not s.name:
                continue
            if s.name in owner and (owner[s.name][1] != (lp.name in frozen)):
                raise _err(f"parameter '{s.name}' is shared by '{owner[s.name][0]}' and '{lp.name}', but "
                           f"--freeze-until freezes only one of them: move --freeze-until", src)
            owner.setdefault(s.name, (lp.name, lp.name in frozen))


def _solver(net, test_graph, opts: FinetuneOptions, out_dir: str, early) -> caffe_pb2.SolverParameter:
    o = opts.solver
    s = caffe_pb2.SolverParameter()
    s.net = os.path.join(out_dir, FILES[0])
    test_data = [lp for lp in net.layer if _is_data(lp) and _phases(lp) == [caffe_pb2.TEST]]
    has_test = bool(test_graph.data_tops or test_graph.inputs) and o.test_interval > 0
    if has_test:
        if o.test_iter is not None:
            iters = o.test_iter
        else:
            iters = None
            if test_data and test_data[0].type == "Data":
                n = _db_count(test_data[0].data_param.source)
                if n is not None:
                    iters = max(1, math.ceil(n / max(1, test_data[0].data_param.batch_size)))
            if iters is None:
                iters = 100
                log.warning("the test LMDB is not readable now: test_iter %d (set it with --test-iter)", iters)
        s.test_iter.append(int(iters))
        s.test_interval = o.test_interval
    s.base_lr = o.base_lr
    s.display = o.display
    s.max_iter = o.max_iter
    s.lr_policy = o.lr_policy
    s.gamma = o.gamma
    if o.lr_policy in ("step", "sigmoid"):
        s.stepsize = o.stepsize
    s.momentum = o.momentum
    s.weight_decay = o.weight_decay
    s.snapshot = o.snapshot
    s.snapshot_prefix = os.path.join(out_dir, SNAPSHOT_STEM)
    if o.seed is not None:
        s.random_seed = o.seed
    s.type = o.type
    s.weights.append(opts.weights)
    if early is not None:
        output, patience, mode = early
        if not has_test:
            raise ResnetcError("--early-stop watches a test output, but the solver does not test (test_interval 0 or "
                               "no TEST data)")
        if output not in test_graph.outputs:
            raise ResnetcError(f"--early-stop: '{output}' is not an output of the TEST net (outputs: "
                               f"{', '.join(test_graph.outputs)})")
        s.resnetc.early_stop_output = output
        s.resnetc.early_stop_patience = patience
        s.resnetc.early_stop_mode = mode
    from .solver.lr_policy import check_policy

    check_policy(s, None)
    return s


def finetune(base: str, opts: FinetuneOptions, out_dir: str) -> FinetunePlan:
    """Plan, then write the three files (each atomically; none when planning fails)."""
    from .models.files import write_texts

    plan = plan_finetune(base, opts, out_dir)
    write_texts(plan.texts())
    return plan
