"""Write files so that readers never see half of one: temp file in the same directory, then rename."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from .errors import ResnetcError


@contextlib.contextmanager
def atomic_path(path: str, *, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it.

    Works for files and directories (an LMDB is a directory): whatever the body creates at the
    yielded path is moved into place in one ``os.replace``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise ResnetcError(f"cannot write {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise ResnetcError(f"cannot write {path}: directory {directory} is not writable")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix + ".tmp", dir=directory)
    os.close(fd)
    os.unlink(tmp)
    try:
        yield tmp
        if os.path.isdir(path) and not os.path.isdir(tmp):
            raise ResnetcError(f"cannot write {path}: it is a directory")
        if os.path.isdir(tmp) and os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
