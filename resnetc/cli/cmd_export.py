"""`resnetc export`, `resnetc classify`, `resnetc time`: a net leaves resnetc as ONNX and runs in onnxruntime."""
from __future__ import annotations

import click
import numpy as np

from ..errors import ResnetcError
from .cmd_inspect import parse_input_shapes


@click.command("export")
@click.option("--onnx", "to_onnx", is_flag=True, default=True, help="Export to ONNX (the only format; default).")
@click.argument("net", type=click.Path(dir_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), help=".caffemodel (or snapshot) to load by layer name.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--batch", default="dynamic", show_default=True, help="'dynamic' or a fixed batch size.")
@click.option("--fold-bn", is_flag=True, help="Fold BatchNorm+Scale into the preceding convolution.")
@click.option("--fp16", is_flag=True, help="Export in float16.")
@click.option("--input", "input_file", type=click.Path(dir_okay=False),
              help="A .npy input (or NAME=FILE.npy) to verify on, besides a random batch.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="BLOB=N,C,H,W",
              help="Shape of a data-layer top whose source is absent.")
@click.option("--tolerance", type=float, default=None, help="Max difference allowed (default 1e-4; 1e-2 with --fp16).")
def export_cmd(to_onnx, net, weights, output, opset, batch, fold_bn, fp16, input_file, input_shapes, tolerance):
    """Export the deploy form of NET to ONNX, verified in onnxruntime against PyTorch."""
    from ..export import export_onnx

    if batch != "dynamic":
        try:
            batch = int(batch)
        except ValueError:
            raise ResnetcError(f"--batch wants 'dynamic' or an integer, got '{batch}'") from None
    inputs = None
    if input_file:
        name, sep, path = input_file.partition("=")
        if not sep:
            name, path = None, input_file
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ResnetcError(f"cannot read the input array: {e}", file=path) from None
        inputs = {name: arr} if name else {"__first__": arr}
    report = export_onnx(net, output, weights=weights, opset=opset, batch=batch, fold_bn=fold_bn, fp16=fp16,
                         inputs=_first_input(net, inputs, input_shapes), input_shapes=parse_input_shapes(input_shapes),
                         tolerance=tolerance)
    click.echo(report.format())


def _first_input(net, inputs, input_shapes):
    if not inputs or "__first__" not in inputs:
        return inputs
    from ..deploy import to_deploy
    from ..graph import build_graph
    from ..prototxt import read_net

    graph = build_graph(to_deploy(read_net(net), input_shapes=parse_input_shapes(input_shapes)), "TEST")
    return {graph.inputs[0]: inputs["__first__"]}


@click.command("classify")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), help="Weights when MODEL is a prototxt (required then).")
@click.option("--labels", type=click.Path(dir_okay=False), help="synset_words.txt: one label per line.")
@click.option("--mean", help="Mean: a .binaryproto file or comma-separated per-channel values (BGR).")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply after mean subtraction.")
@click.option("--images-dim", help="Resize to H,W before centre-cropping to the net's input size.")
@click.option("--top-k", type=int, default=5, show_default=True)
@click.option("--gpu", is_flag=True, help="Use CUDA when available.")
def classify_cmd(model, images, weights, labels, mean, scale, images_dim, top_k, gpu):
    """Classify IMAGES with MODEL (.onnx, or a prototxt + --weights), like Caffe's classify.py."""
    from ..classify import classify_images

    resize = None
    if images_dim:
        try:
            resize = [int(v) for v in images_dim.split(",")]
        except ValueError:
            resize = None
        if not resize or len(resize) != 2 or min(resize) < 1:
            raise ResnetcError(f"--images-dim wants H,W (two positive integers), got '{images_dim}'")
    results = classify_images(model, images, weights=weights, labels=labels, mean=mean, scale=scale, resize=resize,
                              top_k=top_k, device="cuda" if gpu else "cpu")
    for path, ranked in results:
        click.echo(f"{path}:")
        for rank, (idx, prob, name) in enumerate(ranked, 1):
            click.echo(f"  {rank}. {prob:.4f}  {name}  (class {idx})")


@click.command("time")
@click.argument("net", type=click.Path(dir_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False))
@click.option("--iterations", type=int, default=50, show_default=True)
@click.option("--engine", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True)
@click.option("--batch", type=int, default=None, help="Batch size (default: the spec's).")
@click.option("--gpu", is_flag=True, help="Run on CUDA when available.")
@click.option("--phase", type=click.Choice(["TRAIN", "TEST"], case_sensitive=False), default="TEST", show_default=True,
              help="torch engine: the phase the deploy form is built in (`caffe time` defaults to TRAIN).")
@click.option("--fold-bn", is_flag=True, help="onnxruntime engine: fold BatchNorm first.")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: torch's / one per core).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="BLOB=N,C,H,W")
def time_cmd(net, weights, iterations, engine, batch, gpu, phase, fold_bn, threads, input_shapes):
    """Benchmark NET like `caffe time`: per-layer forward/backward (torch) or latency/throughput (onnxruntime).

    NET is a prototxt (its deploy form is timed) or, with --engine onnxruntime, an .onnx file."""
    import torch

    from ..timing import time_onnxruntime, time_onnxruntime_for_net, time_torch, timing_net

    if iterations < 1:
        raise ResnetcError("--iterations must be >= 1")
    if batch is not None and batch < 1:
        raise ResnetcError("--batch must be >= 1")
    if threads is not None and threads < 1:
        raise ResnetcError("--threads must be >= 1")
    if engine == "onnxruntime":
        device = "cuda" if gpu else "cpu"  # onnxruntime-gpu decides, not torch
        if net.endswith(".onnx"):
            if weights or fold_bn or input_shapes:
                raise ResnetcError("--weights, --fold-bn and --input-shape apply to a prototxt; an .onnx model "
                                   "is timed as it is", file=net)
            t = time_onnxruntime(net, iterations, batch=batch, device=device, threads=threads)
        else:
            t = time_onnxruntime_for_net(net, weights, iterations, batch=batch, device=device, fold_bn=fold_bn,
                                         input_shapes=parse_input_shapes(input_shapes), threads=threads)
        if gpu and t.providers[0] != "CUDAExecutionProvider":
            click.echo("onnxruntime has no CUDA provider here (pip install 'resnetc[gpu]'): timed on the CPU", err=True)
        click.echo(t.format())
        return
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    if gpu and device == "cpu":
        click.echo("CUDA is not available: timing on the CPU", err=True)
    if net.endswith(".onnx"):
        raise ResnetcError("the torch engine times a prototxt; time an .onnx file with --engine onnxruntime",
                           file=net)
    if fold_bn:
        raise ResnetcError("--fold-bn applies to --engine onnxruntime")
    if threads:
        torch.set_num_threads(threads)
    cnet = timing_net(net, weights, phase=phase, batch=batch, input_shapes=parse_input_shapes(input_shapes))
    cnet.to(device)
    click.echo(time_torch(cnet, iterations, device=device).format())


COMMANDS = [export_cmd, classify_cmd, time_cmd]
