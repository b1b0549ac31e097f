"""`resnetc check` and `resnetc summary`: validate a net and show its layers, shapes, sizes and cost."""
from __future__ import annotations

import logging

import click

from ..errors import ResnetcError

log = logging.getLogger("resnetc.check")


def parse_input_shapes(values) -> dict:
    """``--input-shape data=1,3,224,224`` (repeatable) -> {"data": (1, 3, 224, 224)}."""
    shapes = {}
    for v in values or ():
        name, sep, dims = v.partition("=")
        if not sep:
            raise ResnetcError(f"--input-shape wants BLOB=N,C,H,W, got '{v}'")
        try:
            shapes[name.strip()] = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise ResnetcError(f"--input-shape: '{dims}' is not a list of integers") from None
    return shapes


def net_options(f):
    f = click.option("--stage", "stages", multiple=True, help="NetState stage (repeatable or comma-separated).")(f)
    f = click.option("--level", type=int, default=None, help="NetState level.")(f)
    f = click.option("--input-shape", "input_shapes", multiple=True, metavar="BLOB=N,C,H,W",
                     help="Shape of an input or data-layer top (repeatable).")(f)
    return f


def _stages(stages) -> list:
    out = []
    for s in stages:
        out.extend(x for x in s.split(","))
    return out


def _unknown_notes(graph) -> list:
    notes = []
    for layer in graph.layers:
        if layer.spec.data or layer.type == "Input":
            for name, shp in zip(layer.caffe_tops, layer.top_shapes):
                if shp is None or None in shp:
                    notes.append(f"note: sizes of '{name}' (layer '{layer.name}', {layer.type}) are unknown "
                                 f"({_why_unknown(layer)}); rules that depend on them were not checked")
    return notes


def _why_unknown(layer) -> str:
    p = layer.param
    for field in ("data_param", "image_data_param", "hdf5_data_param", "window_data_param"):
        if p.HasField(field) and getattr(p, field).source:
            return f"source '{getattr(p, field).source}' not available"
    return "no shape given; use --input-shape"


@click.command("check")
@click.argument("net", type=click.Path(dir_okay=False))
@click.option("--phase", type=click.Choice(["TRAIN", "TEST", "both"], case_sensitive=False), default="both",
              show_default=True, help="Phase(s) to build.")
@net_options
def check_cmd(net, phase, level, stages, input_shapes):
    """Validate NET (text or binary prototxt, V0/V1/V2): parse, upgrade, build each phase, infer shapes.

    Exit 0 when the net is valid (sizes that depend on an absent data source are reported as unknown),
    2 with one line naming file:line and layer otherwise."""
    from ..graph import build_graph
    from ..prototxt import read_net

    src = read_net(net)
    phases = ["TRAIN", "TEST"] if phase.lower() == "both" else [phase.upper()]
    shapes = parse_input_shapes(input_shapes)
    report = []  # printed once every phase built, so that a rejection is the error line alone
    for ph in phases:
        graph = build_graph(src, ph, level=level, stages=_stages(stages), input_shapes=shapes)
        report.extend(n for n in _unknown_notes(graph) if n not in report)
        outs = ", ".join(f"{o} {_fmt(graph.shape(o))}" for o in graph.outputs)
        report.append(f"{net}: {ph}: {len(graph.layers)} layers; outputs: {outs or '(none)'}")
    for line in report:
        click.echo(line)
    click.echo(f"{net}: OK")


def _fmt(shape) -> str:
    from ..summary import fmt_shape

    return fmt_shape(shape)


@click.command("summary")
@click.argument("net", type=click.Path(dir_okay=False))
@click.option("--phase", type=click.Choice(["TRAIN", "TEST"], case_sensitive=False), default="TEST",
              show_default=True)
@net_options
def summary_cmd(net, phase, level, stages, input_shapes):
    """Table of NET's layers: type, top shapes, parameter count, multiply-adds; totals."""
    from ..graph import build_graph
    from ..summary import summarize

    graph = build_graph(net, phase.upper(), level=level, stages=_stages(stages),
                        input_shapes=parse_input_shapes(input_shapes))
    for note in _unknown_notes(graph):
        click.echo(note)
    click.echo(summarize(graph).format())


COMMANDS = [check_cmd, summary_cmd]
