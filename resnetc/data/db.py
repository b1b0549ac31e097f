"""Key-value databases of Datum records: LMDB (through the ``lmdb`` package) and LevelDB (``plyvel``).

Records are read in **key order** (byte-wise lexicographic, as Caffe's cursors do); :meth:`DBReader.cycle`
returns to the first key after the last one, like Caffe's Data layer ("Restarting data prefetching from
start."). Writers build the database in a temporary directory and rename it into place on success, so a
failed conversion never leaves half a database behind.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

from ..atomic import atomic_path
from ..errors import ResnetcError

log = logging.getLogger(__name__)

BACKENDS = ("lmdb", "leveldb")
COMMIT_EVERY = 1000  # Caffe's tools commit a transaction every 1000 records
_INITIAL_MAP_SIZE = 1 << 30


def backend_name(backend) -> str:
    """'lmdb' / 'leveldb' from a string or a ``DataParameter.DB`` enum value (LEVELDB = 0, LMDB = 1)."""
    if isinstance(backend, int):
        return "lmdb" if backend == 1 else "leveldb"
    name = str(backend).lower()
    if name not in BACKENDS:
        raise ResnetcError(f"unknown DB backend '{backend}' (lmdb or leveldb)")
    return name


def _is_lmdb(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "data.mdb"))


def _lmdb():
    try:
        import lmdb
    except ImportError:  # pragma: no cover - depends on the installation
        raise ResnetcError("LMDB data needs the `lmdb` package: pip install lmdb (or `pip install resnetc[data]`)") \
            from None
    return lmdb


_ENVS: dict = {}  # realpath -> [lmdb.Environment, users]: py-lmdb allows one open Environment per path
_ENVS_LOCK = threading.Lock()


def _acquire_env(path: str):
    lmdb = _lmdb()
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            env = lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=512)
            entry = _ENVS[key] = [env, 0]
        entry[1] += 1
        return entry[0]


def _release_env(path: str) -> None:
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _ENVS[key]


class DBReader:
    """Read-only view of one database, in key order."""

    def __init__(self, source: str, backend="lmdb"):
        self.source = os.fspath(source)
        self.backend = backend_name(backend)
        self._closed = True
        if not os.path.exists(self.source):
            raise ResnetcError(f"data source not found ({self.backend.upper()} database)", file=self.source)
        if self.backend == "leveldb" and _is_lmdb(self.source):
            log.warning("%s: backend LEVELDB (Caffe's default) but this is an LMDB database; reading it as LMDB "
                        "(add `backend: LMDB` to data_param to silence this)", self.source)
            self.backend = "lmdb"
        if self.backend == "lmdb":
            self._open_lmdb()
        else:
            self._open_leveldb()
        self._closed = False
        if self._count == 0:
            self.close()
            raise ResnetcError(f"{self.backend.upper()} database has no records", file=self.source)

    # ---- backends
    def _open_lmdb(self) -> None:
        lmdb = _lmdb()
        if not _is_lmdb(self.source):
            raise ResnetcError("not an LMDB database (no data.mdb inside)", file=self.source)
        try:
            self._env = _acquire_env(self.source)
            self._count = self._env.stat()["entries"]
        except lmdb.Error as e:
            raise ResnetcError(f"cannot open LMDB database: {e}", file=self.source) from None

    def _open_leveldb(self) -> None:
        try:
            import plyvel
        except ImportError:
            raise ResnetcError("backend LEVELDB needs the `plyvel` package (pip install plyvel), which is not "
                               "installed; or convert the database to LMDB and set `backend: LMDB`",
                               file=self.source) from None
        try:
            self._db = plyvel.DB(self.source, create_if_missing=False)
        except Exception as e:
            raise ResnetcError(f"cannot open LevelDB database: {e}", file=self.source) from None
        self._count = sum(1 for _ in self._db.iterator(include_value=False))

    # ---- reading
    def __len__(self) -> int:
        return self._count

    def items(self):
        """Every (key, value) once, in key order."""
        if self.backend == "lmdb":
            with self._env.begin(buffers=False) as txn:
                yield from txn.cursor().iternext(keys=True, values=True)
        else:
            yield from self._db.iterator()

    def first(self):
        """The (key, value) of the first record in key order."""
        if self.backend == "lmdb":
            with self._env.begin(buffers=False) as txn:
                cur = txn.cursor()
                cur.first()
                return cur.key(), cur.value()
        it = self._db.iterator()
        try:
            return next(it)
        finally:
            it.close()

    def cycle(self, start: int = 0):
        """(key, value) forever in key order, wrapping at the end (Caffe's cursor), from position ``start``."""
        skip = start % self._count
        while True:
            for kv in self.items():
                if skip:
                    skip -= 1
                    continue
                yield kv
            log.info("%s: Restarting data prefetching from start.", self.source)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.backend == "lmdb":
            _release_env(self.source)
        else:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LMDBWriter:
    """Puts records into an LMDB being built at a temporary path; committed every 1000 records."""

    def __init__(self, path: str):
        lmdb = _lmdb()
        self._lmdb = lmdb
        self.path = path
        self._map_size = _INITIAL_MAP_SIZE
        self._env = lmdb.open(path, map_size=self._map_size, subdir=True, lock=True)
        self._pending = []
        self.count = 0

    def put(self, key, value: bytes) -> None:
        if isinstance(key, str):
            key = key.encode("utf-8")
        self._pending.append((key, value))
        self.count += 1
        if len(self._pending) >= COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for k, v in self._pending:
                        txn.put(k, v)
                break
            except self._lmdb.MapFullError:  # grow the map and replay the transaction
                self._map_size *= 2
                self._env.set_mapsize(self._map_size)
        self._pending.clear()

    def close(self) -> None:
        if self._pending:
            self.commit()
        self._env.sync(True)
        self._env.close()


@contextlib.contextmanager
def write_db(path: str, backend: str = "lmdb"):
    """Build a database at ``path`` atomically: yields a writer with ``put(key, value)``.

    The database is created in a temporary directory next to ``path`` and renamed over it only when the
    body finishes; on any error nothing is left behind (an existing database at ``path`` is replaced only
    on success).
    """
    if backend_name(backend) != "lmdb":
        raise ResnetcError("writing LevelDB databases is not supported; use --backend lmdb", file=path)
    with atomic_path(path) as tmp:
        writer = LMDBWriter(tmp)
        try:
            yield writer
        finally:
            writer.close()
