"""`resnetc convert IN OUT`: weights between .caffemodel, .caffemodel.h5, .pt and .safetensors."""
from __future__ import annotations

import logging

import click

from .cmd_inspect import _stages, net_options, parse_input_shapes

log = logging.getLogger("resnetc.convert")


@click.command("convert")
@click.argument("in_path", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("out_path", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--net", "net_path", type=click.Path(dir_okay=False), default=None,
              help="The net (prototxt): weights are matched to it by layer name with Caffe's shape checks, and "
                   "a .caffemodel written takes its layer definitions from it. Needed to write a .caffemodel "
                   "from .pt / .safetensors / .h5.")
@click.option("--phase", type=click.Choice(["TRAIN", "TEST"], case_sensitive=False), default="TEST",
              show_default=True, help="Phase of the net given with --net.")
@click.option("--reshape", is_flag=True,
              help="Accept a blob whose shape differs from the layer's when the value count is equal.")
@net_options
def convert_cmd(in_path, out_path, net_path, phase, reshape, input_shapes, level, stages):
    """Convert weights IN -> OUT; formats from the names: .caffemodel, .caffemodel.h5, .pt, .safetensors.

    .pt / .safetensors hold {"<layer>/<blob index>": tensor}. A .caffemodel -> .caffemodel conversion
    without --net upgrades a legacy (V0/V1) file to today's form."""
    from ..weights import convert

    result = convert(in_path, out_path, net_path=net_path, phase=phase.upper(),
                     input_shapes=parse_input_shapes(input_shapes), level=level, stages=_stages(stages),
                     strict_shapes=not reshape)
    if result is not None:
        log.info("Copied %d layer(s) from %s; wrote %s", len(result.copied), in_path, out_path)
    else:
        log.info("Wrote %s", out_path)


COMMANDS = [convert_cmd]
