"""Regenerate ``resnetc/proto/caffe_pb2.py`` from ``proto/caffe.proto``.

The one command:  ``python -m resnetc.proto.regenerate``  (needs the ``dev`` extra: grpcio-tools,
which bundles ``protoc``). ``tests/test_schema.py`` fails when the checked-in module is stale.
"""
from __future__ import annotations

import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(REPO, "proto")
OUT = os.path.join(REPO, "resnetc", "proto", "caffe_pb2.py")


def generate(out_dir: str) -> str:
    """Run protoc into ``out_dir``; return the path of the generated caffe_pb2.py."""
    from grpc_tools import protoc  # dev dependency only

    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", os.path.join(PROTO_DIR, "caffe.proto")])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return os.path.join(out_dir, "caffe_pb2.py")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = generate(tmp)
        data = open(src, "rb").read()
    tmp_out = OUT + ".tmp"
    with open(tmp_out, "wb") as f:
        f.write(data)
    os.replace(tmp_out, OUT)
    print(f"wrote {os.path.relpath(OUT, REPO)} ({len(data)} bytes)")


if __name__ == "__main__":
    sys.exit(main())
