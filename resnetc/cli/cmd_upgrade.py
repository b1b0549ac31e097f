"""`resnetc upgrade IN OUT`: Caffe's upgrade_net_proto_text / upgrade_net_proto_binary /
upgrade_solver_proto_text in one command (net or solver is detected from the file)."""
from __future__ import annotations

import logging
import sys

import click

from .. import upgrade
from ..atomic import write_bytes, write_text
from ..prototxt import to_text

log = logging.getLogger("resnetc.upgrade")


@click.command("upgrade")
@click.argument("in_path", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("out_path", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--binary", is_flag=True,
              help="Write a binary proto (default: text, or binary when IN is binary and OUT ends in .caffemodel).")
def upgrade_cmd(in_path: str, out_path: str, binary: bool) -> None:
    """Upgrade a legacy net (V0/V1 layers, input fields, old BatchNorm params; text or .caffemodel) or
    solver (solver_type enum) to today's format, as Caffe's upgrade tools do.

    The file is written even when nothing needed upgrading. Exit 1 when Caffe would report a problem it
    continues past (e.g. a V0 field on a layer type that has no such parameter).
    """
    src = upgrade.read_legacy_file(in_path)
    report = upgrade.upgrade_legacy(src)
    if not report.upgraded:
        log.warning("File already in latest proto format: %s", in_path)
    elif not report.success:
        log.error("Encountered error(s) while upgrading %s; see details above.",
                  "prototxt" if src.kind == "net" and not src.binary else "file")
    as_binary = binary or (src.binary and out_path.lower().endswith(".caffemodel"))
    what = "NetParameter" if src.kind == "net" else "SolverParameter"
    if as_binary:
        write_bytes(out_path, src.param.SerializeToString())
    else:
        write_text(out_path, to_text(src.param))
    log.info("Wrote upgraded %s %s proto to %s", what, "binary" if as_binary else "text", out_path)
    if not report.success:
        sys.exit(1)


COMMANDS = [upgrade_cmd]
