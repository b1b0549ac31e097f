"""ONNX export of the deploy form of a net, verified against PyTorch in onnxruntime; inference sessions.

``export_onnx`` turns a train_val into its deploy form (``resnetc.deploy``), builds the TEST-phase CaffeNet, loads
weights, optionally folds BatchNorm (+Scale) into the preceding Convolution/InnerProduct, exports with input and
output names equal to the Caffe blob names, checks the model with ``onnx.checker``, runs it in onnxruntime on a
random batch (and on a caller's input) and compares with PyTorch. Above tolerance nothing is written.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import os
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path
from .errors import ResnetcError

log = logging.getLogger("resnetc.export")

DEFAULT_OPSET = 17


# ------------------------------------------------------------------------------------------------------------
# onnxruntime


def onnxruntime_module():
    try:
        import onnxruntime as ort
    except ImportError:
        raise ResnetcError("onnxruntime is not installed: pip install 'resnetc[cpu]' (or 'resnetc[gpu]' on CUDA "
                           "machines; never both)") from None
    return ort


def choose_providers(device: Optional[str] = None) -> list:
    """CUDA then CPU when onnxruntime-gpu is installed (its CUDA provider is available), else CPU;
    ``device='cpu'`` asks for CPU only, ``'cuda:N'`` for GPU N (then CPU)."""
    ort = onnxruntime_module()
    available = ort.get_available_providers()
    device = None if device is None else str(device)
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device is not None and not device.startswith("cuda"):
        raise ResnetcError(f"unknown device '{device}' for onnxruntime (cpu, cuda or cuda:N)")
    providers = []
    if "CUDAExecutionProvider" in available:
        index = device.partition(":")[2] if device else ""
        if index:
            try:
                providers.append(("CUDAExecutionProvider", {"device_id": int(index)}))
            except ValueError:
                raise ResnetcError(f"unknown device '{device}' for onnxruntime (cpu, cuda or cuda:N)") from None
        else:
            providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask; a container's limit shows there)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class InferenceSession:
    """An onnxruntime session over an exported model: ``session(data=array) -> {output name: array}``.

    Inputs and outputs are named as the Caffe blobs (``session.inputs``, ``session.outputs``). Providers: CUDA then
    CPU when onnxruntime-gpu is installed (``device='cpu'`` forces CPU). On CUDA, inputs and outputs go through IO
    binding. CPU defaults (see bench/inference.py): every graph optimisation (onnxruntime fuses BatchNorm, Scale,
    bias and ReLU into its own NCHWc convolutions, so an exported net runs the same with or without ``fold_bn``),
    one intra-op thread per usable core, and worker threads that sleep instead of spinning between operators
    (``spinning=False``): on a machine that other processes share, spinning threads lose their time slices and
    the run slows down by up to 2x; on a machine of its own, ``spinning=True`` gains a little latency.
    """

    def __init__(self, path: str, *, device: Optional[str] = None, threads: Optional[int] = None,
                 spinning: bool = False, optimization: str = "all"):
        ort = onnxruntime_module()
        levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise ResnetcError(f"unknown graph optimisation level '{optimization}' (choose from {sorted(levels)})")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[optimization]
        self.threads = int(threads) if threads else usable_cpus()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.spinning = bool(spinning)
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(os.fspath(path), sess_options=opts, providers=choose_providers(device))
        except Exception as e:  # onnxruntime raises its own exception types
            raise ResnetcError(f"onnxruntime cannot load the model: {_first_line(e)}", file=os.fspath(path))
        self.providers = self.session.get_providers()
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.input_shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self.input_dtypes = {i.name: (np.float16 if "float16" in i.type else np.float32)
                             for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.on_gpu = self.providers[0] == "CUDAExecutionProvider"

    def __call__(self, **inputs) -> dict:
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise ResnetcError(f"missing input(s) {missing} (model inputs: {self.inputs})")
        feeds = {n: np.ascontiguousarray(np.asarray(inputs[n], dtype=self.input_dtypes[n])) for n in self.inputs}
        if self.on_gpu:
            binding = self.session.io_binding()
            for n, a in feeds.items():
                binding.bind_cpu_input(n, a)
            for n in self.outputs:
                binding.bind_output(n, "cuda")
            self.session.run_with_iobinding(binding)
            return dict(zip(self.outputs, binding.copy_outputs_to_cpu()))
        try:
            return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
        except Exception as e:  # a wrong shape, mostly
            shapes = {n: list(a.shape) for n, a in feeds.items()}
            raise ResnetcError(f"onnxruntime cannot run the model on inputs {shapes} (model inputs "
                               f"{self.input_shapes}): {_first_line(e)}") from None


# ------------------------------------------------------------------------------------------------------------
# BatchNorm folding


class _ChannelBias(nn.Module):
    """x + b over axis 1: what is left of BatchNorm(+Scale) after its multiplicative part was folded away."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x + self.bias.view(shape)


class _Identity(nn.Module):
    def forward(self, x):
        return x


def fold_batchnorm(net) -> list:
    """Fold TEST-phase BatchNorm (and a following per-channel Scale) into the preceding Convolution /
    InnerProduct, in place on ``net`` (use a copy). Returns the folded (conv, bn[, scale]) layer names."""
    graph = net.graph
    producers = {}
    consumers: dict = {}
    for layer in graph.layers:
        for t in layer.tops:
            producers[t] = layer
        for b in layer.bottoms:
            consumers.setdefault(b, []).append(layer)
    plan_index = {id(entry[0]): i for i, entry in enumerate(net._plan)}
    folded = []
    for layer in graph.layers:
        if layer.type != "BatchNorm" or len(layer.bottoms) != 1:
            continue
        conv = producers.get(layer.bottoms[0])
        if (conv is None or conv.type not in ("Convolution", "InnerProduct")
                or len(consumers.get(layer.bottoms[0], [])) != 1):
            continue
        if conv.type == "Convolution" and conv.param.convolution_param.axis != 1:
            continue
        if conv.type == "InnerProduct" and (conv.param.inner_product_param.transpose
                                            or conv.param.inner_product_param.axis != 1):
            continue
        bp = layer.param.batch_norm_param
        use_global = bp.use_global_stats if bp.HasField("use_global_stats") else layer.phase == "TEST"
        if not use_global:
            continue
        mean_s, var_s, factor = [p.detach().double() for p in net.params[layer.name]]
        s = factor.reshape(()).item()
        s = 0.0 if s == 0 else 1.0 / s
        mean, var = mean_s * s, var_s * s
        inv_std = 1.0 / torch.sqrt(var + bp.eps)
        gamma = torch.ones_like(mean)
        beta = torch.zeros_like(mean)
        scale_layer = None
        nxt = consumers.get(layer.tops[0], [])
        if len(nxt) == 1 and nxt[0].type == "Scale" and len(nxt[0].bottoms) == 1:
            sp = nxt[0].param.scale_param
            if sp.axis == 1 and sp.num_axes == 1:
                scale_layer = nxt[0]
                sparams = net.params[scale_layer.name]
                gamma = sparams[0].detach().double().reshape(-1)
                if len(sparams) > 1:
                    beta = sparams[1].detach().double().reshape(-1)
        w = net.params[conv.name][0]
        mult = (gamma * inv_std)
        shift = beta - mean * mult
        with torch.no_grad():
            w.mul_(mult.to(w.dtype).view([-1] + [1] * (w.dim() - 1)))
            if len(net.params[conv.name]) > 1:
                b = net.params[conv.name][1]
                b.copy_((b.detach().double() * mult + shift).to(b.dtype))
                replacement = _Identity()
            else:
                replacement = _ChannelBias(shift.float())
        i = plan_index[id(net.layer_modules[layer.name])]
        _, bottoms, tops, detach = net._plan[i]
        net._plan[i] = (replacement, bottoms, tops, detach)
        net.layers[net._module_keys[layer.name]] = replacement
        if scale_layer is not None:
            j = plan_index[id(net.layer_modules[scale_layer.name])]
            _, bottoms, tops, detach = net._plan[j]
            net._plan[j] = (_Identity(), bottoms, tops, detach)
            net.layers[net._module_keys[scale_layer.name]] = _Identity()
        folded.append((conv.name, layer.name) + ((scale_layer.name,) if scale_layer else ()))
    return folded


# ------------------------------------------------------------------------------------------------------------
# export


class _Positional(nn.Module):
    """The CaffeNet with positional inputs and a tuple of outputs, for the exporter."""

    def __init__(self, net, inputs: Sequence[str], outputs: Sequence[str]):
        super().__init__()
        self.net = net
        self.input_names = list(inputs)
        self.output_names = list(outputs)

    def forward(self, *args):
        outs = self.net(**dict(zip(self.input_names, args)))
        return tuple(outs[o] for o in self.output_names)


@dataclasses.dataclass
class ExportReport:
    path: str
    inputs: list
    outputs: list
    max_abs: float
    max_rel: float
    tolerance: float
    folded: list
    providers: list
    opset: int
    fp16: bool = False

    def format(self) -> str:
        return (f"exported {self.path}: inputs {self.inputs}, outputs {self.outputs}, opset {self.opset}"
                f"{', float16' if self.fp16 else ''}; onnxruntime ({self.providers[0]}) vs PyTorch"
                f"{' float32' if self.fp16 else ''}: max abs diff {self.max_abs:.3g}, max rel diff "
                f"{self.max_rel:.3g} (tolerance {self.tolerance:g})"
                + (f"; folded {len(self.folded)} BatchNorm layers" if self.folded else ""))


def _compare(ref: dict, got: dict) -> tuple:
    """(max abs diff, max of abs diff / max(1, max finite |reference|)) over all outputs. Positions where both
    sides are the same infinity or both NaN agree; a non-finite value on one side only is an infinite diff."""
    max_abs = max_rel = 0.0
    for name, r in ref.items():
        r = np.asarray(r, dtype=np.float64)
        g = np.asarray(got[name], dtype=np.float64).reshape(r.shape)
        if r.size == 0:
            continue
        with np.errstate(invalid="ignore"):
            d = np.abs(r - g)
        agree = (np.isnan(r) & np.isnan(g)) | (np.isinf(r) & (r == g))
        d = np.where(agree, 0.0, np.where(np.isnan(d), np.inf, d))
        finite = np.abs(r[np.isfinite(r)])
        d_max = float(d.max())
        max_abs = max(max_abs, d_max)
        max_rel = max(max_rel, d_max / max(1.0, float(finite.max()) if finite.size else 1.0))
    return max_abs, max_rel


# ------------------------------------------------------------------------------------------------------------
# float16


# inputs that ONNX wants in float32 whatever the data type: Resize's roi and scales, Upsample's scales
_FLOAT32_SLOTS = {"Resize": (1, 2), "Upsample": (1,)}


def to_float16(model, layer_of=None):
    """The float32 ONNX ``model`` computing in float16: inputs, outputs, weights and activations in float16.

    Only the data path changes: a node is converted when one of its float inputs derives from a graph input
    through float tensors. Shape arithmetic (Shape -> Cast -> ...) and constant subgraphs over weights stay float32
    and are cast to float16 where they meet the data path; onnxruntime folds those constants when it loads the
    model. Initializers and Constant nodes that only the data path reads are stored in float16 (half the size).
    ``layer_of``: ONNX value name -> Caffe layer name, for errors (a constant beyond float16's range)."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    inits = {t.name: t for t in g.initializer}
    elem = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            elem[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        elem[t.name] = t.data_type
    inferred = onnx_shape_types(model)
    for k, v in inferred.items():
        elem.setdefault(k, v)
    tainted = {vi.name for vi in g.input if elem.get(vi.name) == F32 and vi.name not in inits}
    producers = {}
    consumers: dict = {}
    for node in g.node:
        for o in node.output:
            producers[o] = node
        for i, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, i))
    in_domain = set()
    for node in g.node:  # topological order
        slots = _FLOAT32_SLOTS.get(node.op_type, ())
        if any(name in tainted for i, name in enumerate(node.input) if i not in slots):
            in_domain.add(id(node))
            if node.op_type == "Cast":
                floats = any(at.name == "to" and at.i in (F32, F16) for at in node.attribute)
                tainted.update(node.output if floats else ())
            else:
                tainted.update(o for o in node.output if elem.get(o, F32) == F32)

    def only_data_path(name):
        return all(id(n) in in_domain and i not in _FLOAT32_SLOTS.get(n.op_type, ()) for n, i in consumers[name])

    new_nodes = []
    casts = {}
    converted_consts = set()
    for node in g.node:
        if id(node) in in_domain:
            if node.op_type == "Cast":
                for a in node.attribute:
                    if a.name == "to" and a.i == F32:
                        a.i = F16
            slots = _FLOAT32_SLOTS.get(node.op_type, ())
            for i, name in enumerate(node.input):
                if not name or name in tainted:
                    if name in tainted and i in slots:  # data-dependent scales: back to float32
                        key = (name, F32)
                        if key not in casts:
                            casts[key] = name + "__f32"
                            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=F32))
                        node.input[i] = casts[key]
                    continue
                if i in slots or elem.get(name) != F32:
                    continue
                prod = producers.get(name)
                if name in inits and only_data_path(name):
                    t = inits[name]
                    if name not in converted_consts:
                        t.CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(t), name, layer_of), name))
                        converted_consts.add(name)
                elif prod is not None and prod.op_type in ("Constant", "ConstantOfShape") and only_data_path(name):
                    if name not in converted_consts:
                        for a in prod.attribute:
                            if a.name == "value" and a.t.data_type == F32:
                                arr = _half(numpy_helper.to_array(a.t), name, layer_of)
                                a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))
                        converted_consts.add(name)
                else:
                    key = (name, F16)
                    if key not in casts:
                        casts[key] = name + "__f16"
                        new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=F16))
                    node.input[i] = casts[key]
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    for vi in list(g.input) + list(g.output):
        if vi.name in tainted and vi.type.tensor_type.elem_type == F32:
            vi.type.tensor_type.elem_type = F16
    del g.value_info[:]
    return model


def _half(arr: np.ndarray, name: str, layer_of=None) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = arr.astype(np.float16)
    if np.isinf(out).sum() > np.isinf(arr).sum():
        big = float(np.abs(arr[np.isfinite(arr)]).max())
        layer = layer_of(name) if layer_of else None
        what = "a constant of this layer" if layer else f"constant '{name}'"
        raise ResnetcError(f"float16 export: {what} holds {big:.4g}, beyond float16's range (65504): export it in "
                           f"float32", layer=layer)
    return out


def _onnx_layer_names(net):
    """ONNX value name -> Caffe layer name: torch names values inside module ``net.<key>`` '/net/<key>/...' and
    parameters 'net.layers.<key>.<...>'."""
    by_key = {key: name for name, key in net._module_keys.items()}

    def layer_of(value: str):
        for part in value.replace(".", "/").split("/"):
            if part in by_key:
                return by_key[part]
        return None

    return layer_of


def onnx_shape_types(model) -> dict:
    """{value name: ONNX element type} from onnx's shape inference (empty when it fails)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return {}
    return {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info
            if vi.type.HasField("tensor_type")}


def prepare_deploy_net(net_path, weights=None, *, batch=None, input_shapes=None, fold_bn=False):
    """(CaffeNet in TEST phase of the deploy form, folded layer names)."""
    from .deploy import to_deploy
    from .net import CaffeNet
    from .graph import build_graph
    from .prototxt import read_net

    src = read_net(os.fspath(net_path))
    dep = to_deploy(src, batch=batch, input_shapes=input_shapes)
    graph = build_graph(dep, "TEST", input_shapes=input_shapes)
    net = CaffeNet(graph)
    if weights:
        from .weights import load_caffemodel

        load_caffemodel(net, weights)
    net.eval()
    folded = fold_batchnorm(net) if fold_bn else []
    return net, folded


def export_onnx(net, path: str, *, weights: Optional[str] = None, opset: int = DEFAULT_OPSET,
                batch="dynamic", fold_bn: bool = False, fp16: bool = False, verify: bool = True,
                inputs: Optional[dict] = None, input_shapes: Optional[dict] = None,
                tolerance: Optional[float] = None, seed: int = 0) -> ExportReport:
    """Export ``net`` (a CaffeNet, or a prototxt path) to ONNX at ``path``; verify it; return the figures.

    ``batch``: "dynamic" (a symbolic batch axis) or an int. ``inputs``: extra {input name: array} to verify on.
    Raises ResnetcError (and writes nothing) when onnxruntime disagrees with PyTorch beyond ``tolerance``
    (default 1e-4 relative to max(1, |reference|) in float32; 1e-2 with ``fp16``).

    ``fp16``: the float32 export converted to compute in float16 (``to_float16``: inputs, outputs, weights and
    activations); it is verified against the float32 PyTorch net, so the report shows what half precision costs.
    onnxruntime's CPU provider runs it (casting around the operators it has no float16 kernel for), slowly: the
    point of a float16 model is a GPU."""
    import onnx

    dynamic = batch in (None, "dynamic")
    fixed_batch = None if dynamic else int(batch)
    if not isinstance(net, nn.Module):
        net, folded = prepare_deploy_net(net, weights, batch=fixed_batch, input_shapes=input_shapes, fold_bn=fold_bn)
    else:
        net = copy.deepcopy(net)
        if weights:
            from .weights import load_caffemodel

            load_caffemodel(net, weights)
        folded = fold_batchnorm(net) if fold_bn else []
    if net.graph.data_tops:
        raise ResnetcError("export needs the deploy form of the net (its data layers replaced by inputs); pass the "
                           "prototxt path so resnetc converts it", file=net.graph.file)
    in_names = list(net.inputs)
    out_names = list(net.outputs)
    if not in_names:
        raise ResnetcError("the net has no inputs to export", file=net.graph.file)
    rng = np.random.RandomState(seed)
    samples = []
    example = []
    for name in in_names:
        shape = net.graph.shape(name)
        if shape is None or None in shape:
            raise ResnetcError(f"the shape of input '{name}' is unknown (give --input-shape {name}=N,C,H,W)",
                               file=net.graph.file)
        shape = list(shape)
        if fixed_batch is not None:
            shape[0] = fixed_batch
        example.append(torch.from_numpy(rng.rand(*shape).astype(np.float32)))
    samples.append(example)
    if inputs:
        missing = [n for n in in_names if n not in inputs]
        if missing:
            raise ResnetcError(f"the input to verify on lacks {missing} (the net's inputs: {in_names})",
                               file=net.graph.file)
        samples.append([torch.as_tensor(np.asarray(inputs[n], dtype=np.float32)) for n in in_names])
    wrapper = _Positional(net, in_names, out_names).eval()
    dtype = torch.float32
    dynamic_axes = {n: {0: "N"} for n in in_names + out_names} if dynamic else None
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_torch_onnx():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(t.to(dtype) for t in example), buf, dynamo=False,
                              input_names=in_names, output_names=out_names, opset_version=opset,
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
    except ResnetcError:
        raise
    except Exception as e:  # the exporter's own errors: name the layer when we can
        raise ResnetcError(f"ONNX export failed: {_first_line(e)}", file=net.graph.file) from None
    model = onnx.load_from_string(buf.getvalue())
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ResnetcError(f"onnx.checker rejects the exported model: {_first_line(e)}", file=net.graph.file)
    if fp16:
        try:
            model = to_float16(model, _onnx_layer_names(net))
        except ResnetcError as e:
            raise e.at(file=net.graph.file)
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise ResnetcError(f"onnx.checker rejects the float16 model: {_first_line(e)}", file=net.graph.file)
    tolerance = tolerance if tolerance is not None else (1e-2 if fp16 else 1e-4)
    max_abs = max_rel = 0.0
    providers = ["(not verified)"]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
        if verify:
            session = InferenceSession(tmp, device="cpu" if not torch.cuda.is_available() else None)
            providers = session.providers
            for sample in samples:
                with torch.no_grad():
                    ref = wrapper(*[t.to(dtype) for t in sample])
                ref = {n: r.float().numpy() for n, r in zip(out_names, ref)}
                got = session(**{n: t.numpy() for n, t in zip(in_names, sample)})
                a, r = _compare(ref, got)
                max_abs, max_rel = max(max_abs, a), max(max_rel, r)
            if not max_rel <= tolerance:
                what = "the float16 model in onnxruntime disagrees with PyTorch float32" if fp16 else \
                    "onnxruntime disagrees with PyTorch"
                hint = " (float16 overflows beyond 65504)" if fp16 and not np.isfinite(max_abs) else ""
                raise ResnetcError(f"{what}: max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g} > tolerance "
                                   f"{tolerance:g}{hint}; nothing written", file=os.fspath(path))
    report = ExportReport(os.fspath(path), in_names, out_names, max_abs, max_rel, tolerance, folded, providers, opset,
                          fp16)
    log.info(report.format())
    return report


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet_torch_onnx():
    logger = logging.getLogger("torch.onnx")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)
