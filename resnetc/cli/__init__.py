"""The `resnetc` command line (click).

Every command lives in one module ``resnetc/cli/cmd_<name>.py`` exposing ``COMMANDS = [click.Command, ...]``;
this package collects them, so each command has exactly one definition. Commands are thin: they parse
flags and call the library. A :class:`ResnetcError` anywhere becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
import sys

import click

from ..errors import ResnetcError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ResnetcError as e:
            click.echo(f"resnetc: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("resnetc: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="resnetc")
def main(verbose: bool, quiet: bool) -> None:
    """resnetc: Caffe specs and weights, compiled to PyTorch and ONNX."""
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    setup_logging(level)


def setup_logging(level=logging.INFO, log_file=None) -> None:
    """Caffe-like log lines (`I1124 18:20:38.553125 solver.py] Iteration 100 ...`) to stderr (and a file)."""
    root = logging.getLogger("resnetc")
    root.setLevel(level)
    fmt = logging.Formatter("%(levelname).1s%(asctime)s.%(msecs)03d %(module)s.py] %(message)s", "%m%d %H:%M:%S")
    if not any(getattr(h, "_resnetc", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h._resnetc = True
        h.setFormatter(fmt)
        root.addHandler(h)
    for h in root.handlers:
        if getattr(h, "_resnetc", False):
            h.setLevel(level)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh._resnetc_file = True
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False


def _load_commands() -> None:
    from .. import cli as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if mod.name.startswith("cmd_"):
            m = importlib.import_module(f"{pkg.__name__}.{mod.name}")
            for cmd in getattr(m, "COMMANDS", []):
                main.add_command(cmd)


_load_commands()

if __name__ == "__main__":
    main()
