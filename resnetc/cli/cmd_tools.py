"""`resnetc draw`, `resnetc plot`, `resnetc parse-log`: Caffe's draw_net.py, plot_training_log and parse_log."""
from __future__ import annotations

import os

import click

from .cmd_inspect import parse_input_shapes


@click.command("draw")
@click.argument("net", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--rankdir", type=click.Choice(["LR", "TB", "BT", "RL"]), default="LR", show_default=True)
@click.option("--phase", type=click.Choice(["TRAIN", "TEST"], case_sensitive=False), default="TEST", show_default=True)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="BLOB=N,C,H,W")
def draw_cmd(net, out, rankdir, phase, input_shapes):
    """Draw NET to OUT (.png, .svg, .pdf or .dot): layers with key parameters, blobs with shapes."""
    from ..draw import draw
    from ..graph import build_graph

    graph = build_graph(net, phase.upper(), input_shapes=parse_input_shapes(input_shapes))
    draw(graph, out, rankdir)
    click.echo(f"wrote {out}")


@click.command("plot")
@click.argument("logs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", default="curves.png", show_default=True, type=click.Path(dir_okay=False))
def plot_cmd(logs, output):
    """Plot training loss, test outputs and learning rate of LOGS (Caffe or resnetc logs) against iterations."""
    from ..logparse import parse_log, plot_logs

    plot_logs([parse_log(p) for p in logs], output)
    click.echo(f"wrote {output}")


@click.command("parse-log")
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("-o", "--output-dir", default=None, type=click.Path(file_okay=False),
              help="Where LOG.train and LOG.test go (default: beside the log).")
def parse_log_cmd(log, output_dir):
    """Write LOG's train and test tables as CSV (LOG.train, LOG.test), like Caffe's parse_log.py."""
    from ..logparse import parse_log, write_csvs

    tables = parse_log(log)
    base = os.path.basename(log)
    if base.endswith(".gz"):
        base = base[:-3]
    prefix = os.path.join(output_dir or os.path.dirname(os.path.abspath(log)), base)
    train, test = write_csvs(tables, prefix)
    click.echo(f"wrote {train} ({len(tables.train)} rows) and {test} ({len(tables.test)} rows)")


COMMANDS = [draw_cmd, plot_cmd, parse_log_cmd]
