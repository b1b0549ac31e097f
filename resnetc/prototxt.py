"""Read and write Caffe protos: text (.prototxt) and binary (.caffemodel, .solverstate, .binaryproto).

Parse errors become one :class:`ResnetcError` line ``FILE:LINE:COL: what was expected``. Layer line
numbers are recovered from the text so later stages can name ``file:line`` for every layer.
"""
from __future__ import annotations

import dataclasses
import os
import re

from google.protobuf import message as _pb_message
from google.protobuf import text_format

from .atomic import write_bytes, write_text
from .errors import ResnetcError
from .proto import caffe_pb2

__all__ = [
    "NetSource", "read_net", "read_solver", "parse_net_text", "parse_solver_text", "read_binary",
    "read_text", "to_text", "write_net_text", "write_binary", "layer_lines", "caffe_pb2",
]


@dataclasses.dataclass
class NetSource:
    """A NetParameter (already upgraded to V2) and where it came from."""

    param: caffe_pb2.NetParameter
    file: str | None = None
    # first line of each layer block, by layer name (survives the legacy upgrade, which keeps names)
    lines: dict = dataclasses.field(default_factory=dict)
    upgrade_log: list = dataclasses.field(default_factory=list)
    binary: bool = False

    def line_of(self, layer_name: str | None) -> int | None:
        return self.lines.get(layer_name) if layer_name is not None else None


_TOKEN_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|#[^\n]*|[{}]|[A-Za-z_][A-Za-z0-9_]*|\n')


def layer_lines(text: str) -> dict:
    """Map layer name -> 1-based line of its top-level ``layer {`` / ``layers {`` block (V0, V1, V2).

    A light scan (strings and comments skipped, braces counted), not a parser: it only has to agree with
    the real parse on files that parsed.
    """
    depth = 0
    line = 1
    lines: dict = {}
    block_start = None  # (depth at which the block's fields live, line)
    pending_key = None
    pending_line = 0
    expect_name = False
    for m in _TOKEN_RE.finditer(text):
        tok = m.group(0)
        if tok == "\n":
            line += 1
            continue
        if tok.startswith("#"):
            continue
        if tok == "{":
            depth += 1
            if depth == 1 and pending_key in ("layer", "layers"):
                block_start = pending_line
            pending_key = None
            continue
        if tok == "}":
            depth -= 1
            if depth == 0:
                block_start = None
            continue
        if tok[0] in "\"'":
            if expect_name and block_start is not None:
                name = bytes(tok[1:-1], "utf-8").decode("unicode_escape") if "\\" in tok else tok[1:-1]
                lines.setdefault(name, block_start)
            expect_name = False
            continue
        # identifier
        if depth == 0:
            pending_key, pending_line = tok, line
        # `name:` directly inside the layer block (depth 1), or inside a V0 nested `layer {}` (depth 2)
        expect_name = tok == "name" and block_start is not None and depth in (1, 2)
    return lines


def _parse_text(text: str, msg, file: str | None):
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        detail = str(e)
        detail = re.sub(r"^\d+:\d+\s*:\s*", "", detail)
        if "has no field named" in detail:
            detail += (" It is not a field of BVLC Caffe's schema: the file was written for a fork of Caffe "
                       "(e.g. SSD's Permute/PriorBox parameters); resnetc reads BVLC Caffe files, and custom "
                       "layers can be registered with resnetc.layers.register")
        raise ResnetcError(f"cannot parse {type(msg).__name__}: {detail}", file=file, line=line, col=col) from None
    except (ValueError, UnicodeError) as e:
        raise ResnetcError(f"cannot parse {type(msg).__name__}: {e}", file=file) from None
    return msg


def _read_file(path: str) -> bytes:
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
    if not data:
        return False
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    # text protos are printable; control characters other than whitespace mean wire format
    return any(ord(c) < 9 or (13 < ord(c) < 32) for c in text[:4096])


def read_binary(path: str, msg_cls, *, data: bytes | None = None):
    """Parse a binary proto file; errors name the file."""
    data = _read_file(path) if data is None else data
    msg = msg_cls()
    try:
        msg.ParseFromString(data)
    except (_pb_message.DecodeError, RuntimeError, ValueError) as e:
        raise ResnetcError(f"not a valid binary {msg_cls.__name__} (truncated or corrupt file?): {e}",
                           file=path) from None
    return msg


def read_text(path: str, msg_cls):
    data = _read_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ResnetcError(f"not a text {msg_cls.__name__} (binary or not UTF-8)", file=path) from None
    return _parse_text(text, msg_cls(), path)


def parse_net_text(text: str, file: str | None = None, *, upgrade: bool = True) -> NetSource:
    param = _parse_text(text, caffe_pb2.NetParameter(), file)
    src = NetSource(param=param, file=file, lines=layer_lines(text))
    if upgrade:
        _upgrade(src)
    return src


def _upgrade(src: NetSource) -> None:
    from . import upgrade  # local import: upgrade imports this module's helpers

    src.upgrade_log = upgrade.upgrade_net(src.param, src.file or "<string>", lines=src.lines)


def read_net(path: str, *, upgrade: bool = True) -> NetSource:
    """Read a NetParameter from a text prototxt or a binary .caffemodel (detected from the content),
    upgraded from V0/V1 to today's form unless ``upgrade=False``."""
    path = os.fspath(path)
    data = _read_file(path)
    if _looks_binary(data):
        param = read_binary(path, caffe_pb2.NetParameter, data=data)
        src = NetSource(param=param, file=path, binary=True)
        if upgrade:
            _upgrade(src)
        return src
    return parse_net_text(data.decode("utf-8"), path, upgrade=upgrade)


def parse_solver_text(text: str, file: str | None = None, *, upgrade: bool = True):
    solver = _parse_text(text, caffe_pb2.SolverParameter(), file)
    if upgrade:
        from . import upgrade as _up

        _up.upgrade_solver(solver, file or "<string>")
    return solver


def read_solver(path: str, *, upgrade: bool = True) -> caffe_pb2.SolverParameter:
    path = os.fspath(path)
    data = _read_file(path)
    if _looks_binary(data):
        solver = read_binary(path, caffe_pb2.SolverParameter, data=data)
        if upgrade:
            from . import upgrade as _up

            _up.upgrade_solver(solver, path)
        return solver
    return parse_solver_text(data.decode("utf-8"), path, upgrade=upgrade)


def to_text(msg) -> str:
    """Text format as Caffe prints it: 2-space indent, fields in field-number order, enums by name."""
    return text_format.MessageToString(msg, indent=0, as_utf8=True)


def write_net_text(msg, path: str) -> None:
    write_text(path, to_text(msg))


def write_binary(msg, path: str) -> None:
    write_bytes(path, msg.SerializeToString())
