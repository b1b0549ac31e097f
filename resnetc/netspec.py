"""Write Caffe nets in Python: pycaffe's ``net_spec`` API, against our own schema.

::

    from resnetc.netspec import NetSpec, L, P, TRAIN, TEST
    n = NetSpec()
    n.data, n.label = L.Data(source="train_lmdb", backend=P.Data.LMDB, batch_size=64, ntop=2,
                             transform_param=dict(mirror=True), include=dict(phase=TRAIN))
    n.conv1 = L.Convolution(n.data, kernel_size=7, stride=2, num_output=64, bias_term=False,
                            weight_filler=dict(type="msra"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.loss = L.SoftmaxWithLoss(n.relu1, n.label)
    net = n.to_proto()           # a caffe_pb2.NetParameter; resnetc.prototxt.to_text(net) gives the text

Naming follows pycaffe exactly, so code written for pycaffe produces the same files here:

* the NetSpec attribute a top is stored under names that top, and its layer is named after its first top;
  a ``name=`` keyword overrides the layer name only;
* a top never stored on the NetSpec gets ``<Type><k>`` (``Convolution1``, ``Pooling2``…), numbered per type
  in the order the net is walked;
* ``in_place=True`` makes the layer's tops its bottoms' names (the attribute then names the layer only);
* ``ntop=k`` gives a tuple of k tops (``ntop=0`` gives the layer itself, e.g. ``Silence``);
* layers come out in the order the NetSpec's tops were assigned, each preceded by the layers it needs.

Keyword arguments go where pycaffe puts them: a keyword ending in ``param`` (``param=[dict(lr_mult=1)]``,
``transform_param=dict(...)``, ``convolution_param=dict(...)``) onto the LayerParameter itself; any other
keyword into the type's own parameter message (``num_output`` -> ``convolution_param.num_output``), or,
when that message has no such field, onto the LayerParameter (``include``, ``loss_weight``, ``name``,
``propagate_down``…). Dicts fill messages, lists fill repeated fields (a scalar given for a repeated field
is a one-element list), enums take their value (``P.Pooling.MAX``) or their name (``"MAX"``).

Beyond pycaffe (which raises for them): types that share another type's parameter message
(``Deconvolution`` -> ``convolution_param``, ``LSTM``/``RNN`` -> ``recurrent_param``, …) accept the short
keywords too, and a keyword that fits nowhere, or a value of the wrong type, is a :class:`ResnetcError`
naming the layer.
"""
from __future__ import annotations

import collections

from google.protobuf import message as _pb_message

from .errors import ResnetcError
from .proto import caffe_pb2

__all__ = ["NetSpec", "Top", "Function", "Layers", "Parameters", "layers", "params", "L", "P",
           "TRAIN", "TEST", "to_proto", "param_name_dict"]

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


def param_name_dict() -> dict:
    """{layer type: its ``<x>_param`` field stem}, read from the schema as pycaffe does.

    The rule: a ``LayerParameter`` field ``foo_param`` of message type ``FooParameter`` serves type ``Foo``
    (``convolution_param``: ConvolutionParameter -> ``Convolution``; ``hdf5_data_param`` -> ``HDF5Data``).
    """
    out = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if not field.name.endswith("_param") or field.message_type is None:
            continue
        type_name = field.message_type.name
        if type_name.endswith("Parameter"):
            out[type_name[: -len("Parameter")]] = field.name[: -len("_param")]
    return out


# layer types whose parameters live in a message named for another type (Caffe shares the message)
_SHARED_PARAM = {
    "Deconvolution": "convolution",
    "Im2col": "convolution",
    "LSTM": "recurrent",
    "RNN": "recurrent",
    "SoftmaxWithLoss": "softmax",
    "SigmoidCrossEntropyLoss": "loss",
}

_PARAM_FIELD = param_name_dict()


def _param_stem(type_name: str):
    return _PARAM_FIELD.get(type_name) or _SHARED_PARAM.get(type_name)


def _has_field(msg, name: str) -> bool:
    return name in msg.DESCRIPTOR.fields_by_name


def _assign(msg, name: str, value, where) -> None:
    """Set ``msg.<name>`` from a Python value: dict -> message, list -> repeated, else scalar."""
    field = msg.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        raise where(f"{type(msg).__name__} has no field '{name}'")
    repeated = field.is_repeated
    is_message = field.message_type is not None
    try:
        if repeated:
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            container = getattr(msg, name)
            for v in values:
                if is_message:
                    if not isinstance(v, (dict, _pb_message.Message)):
                        raise where(f"'{name}' takes dicts (one per {field.message_type.name}), got {v!r}")
                    _fill(container.add(), v, where)
                else:
                    container.append(_enum_value(field, v, where))
        elif is_message:
            if not isinstance(value, (dict, _pb_message.Message)):
                raise where(f"'{name}' takes a dict ({field.message_type.name}), got {value!r}")
            _fill(getattr(msg, name), value, where)
        else:
            setattr(msg, name, _enum_value(field, value, where))
    except (TypeError, ValueError) as e:
        raise where(f"bad value {value!r} for '{name}': {e}") from None


def _enum_value(field, v, where):
    if field.enum_type is not None and isinstance(v, str):
        ev = field.enum_type.values_by_name.get(v)
        if ev is None:
            names = ", ".join(x.name for x in field.enum_type.values)
            raise where(f"'{field.name}' is one of {names}; got {v!r}")
        return ev.number
    return v


def _fill(msg, value, where) -> None:
    if isinstance(value, _pb_message.Message):
        msg.CopyFrom(value)
        return
    for k, v in value.items():
        _assign(msg, k, v, where)


class NotATopError(ResnetcError, TypeError):
    """A layer input that is not a Top (a TypeError, as in pycaffe)."""


class Top:
    """One output blob of a layer function (``fn``), the ``n``-th of its tops."""

    def __init__(self, fn: "Function", n: int):
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """The net that computes this top (names of its own: no NetSpec attributes)."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames):
        return self.fn._to_proto(layers, names, autonames)


class Function:
    """A layer not yet written: its type, its input Tops and its keyword parameters."""

    def __init__(self, type_name: str, inputs, params: dict):
        self.type_name = type_name
        for i, inp in enumerate(inputs):
            if not isinstance(inp, Top):
                raise NotATopError(f"{type_name} input {i} is not a Top (type is {type(inp).__name__}): pass the "
                                   f"outputs of L.<Type>(...) or NetSpec attributes", layer_type=type_name)
        self.inputs = tuple(inputs)
        params = dict(params)
        self.ntop = params.pop("ntop", 1)
        self.in_place = params.pop("in_place", False)
        self.params = params
        self.tops = tuple(Top(self, k) for k in range(self.ntop))

    def _auto(self, autonames) -> str:
        autonames[self.type_name] += 1
        return f"{self.type_name}{autonames[self.type_name]}"

    def _top_name(self, top: Top, names, autonames) -> str:
        if top not in names:
            names[top] = top.fn._auto(autonames)
        return names[top]

    def _layer_name(self, names, autonames) -> str:
        if self not in names:
            names[self] = self._top_name(self.tops[0], names, autonames) if self.ntop > 0 else self._auto(autonames)
        return names[self]

    def _to_proto(self, layers: dict, names: dict, autonames) -> None:
        if self in layers:
            return
        bottoms = []
        for inp in self.inputs:
            inp._to_proto(layers, names, autonames)
            bottoms.append(layers[inp.fn].top[inp.n])
        lp = caffe_pb2.LayerParameter()
        lp.type = self.type_name
        lp.bottom.extend(bottoms)
        if self.in_place:
            lp.top.extend(bottoms)
        else:
            lp.top.extend(self._top_name(t, names, autonames) for t in self.tops)
        lp.name = self._layer_name(names, autonames)

        def where(msg):
            return ResnetcError(msg, layer=lp.name, layer_type=self.type_name)

        stem = _param_stem(self.type_name)
        own = getattr(lp, stem + "_param") if stem else None
        for k, v in self.params.items():
            if k.endswith("param"):
                _assign(lp, k, v, where)
            elif own is not None and _has_field(own, k):
                _assign(own, k, v, where)
            elif _has_field(lp, k):
                _assign(lp, k, v, where)
            else:
                fits = f" or {type(own).__name__}" if own is not None else ""
                raise where(f"unknown parameter '{k}': not a field of LayerParameter{fits}")
        layers[self] = lp


def to_proto(*tops: Top) -> caffe_pb2.NetParameter:
    """The net computing ``tops`` (all names automatic)."""
    layers = collections.OrderedDict()
    autonames = collections.Counter()
    for top in tops:
        top._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """An ordered set of named tops; ``to_proto()`` writes every layer they need, named after them."""

    def __init__(self):
        super().__setattr__("tops", collections.OrderedDict())

    def __setattr__(self, name, value):
        self.tops[name] = value

    def __getattr__(self, name):
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key, value):
        self.tops[key] = value

    def __getitem__(self, key):
        return self.tops[key]

    def __delitem__(self, key):
        del self.tops[key]

    def __contains__(self, key):
        return key in self.tops

    def keys(self):
        return list(self.tops.keys())

    def vals(self):
        return list(self.tops.values())

    def to_proto(self, name: str | None = None) -> caffe_pb2.NetParameter:
        """The NetParameter (optionally with ``name:`` set; pycaffe leaves it empty)."""
        names = {}
        for k, v in self.tops.items():
            names[v] = k
        autonames = collections.Counter()
        layers = collections.OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        if name:
            net.name = name
        net.layer.extend(layers.values())
        return net


class Layers:
    """``L.<Type>(*bottoms, **params)`` -> a Top, a tuple of Tops (``ntop>1``) or the layer (``ntop=0``)."""

    def __getattr__(self, type_name):
        if type_name.startswith("__"):
            raise AttributeError(type_name)

        def layer_fn(*args, **kwargs):
            fn = Function(type_name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        layer_fn.__name__ = type_name
        return layer_fn


class Parameters:
    """``P.<Type>.<ENUM_VALUE>``: enum values of ``<Type>Parameter`` (``P.Pooling.MAX``, ``P.Data.LMDB``)."""

    def __getattr__(self, type_name):
        if type_name.startswith("__"):
            raise AttributeError(type_name)
        msg = getattr(caffe_pb2, type_name + "Parameter", None)
        if msg is None:
            raise AttributeError(f"caffe_pb2 has no message {type_name}Parameter")

        class _Enums:
            def __getattr__(self, value_name):
                if value_name.startswith("__"):
                    raise AttributeError(value_name)
                return getattr(msg, value_name)

        return _Enums()


layers = L = Layers()
params = P = Parameters()
