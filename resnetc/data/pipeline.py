"""Input pipelines: one per data layer, yielding batches ``{top name: torch tensor}`` for a CaffeNet.

Data layers are not modules of the net: their tops are keyword inputs of ``net(...)``. A pipeline reads
records in Caffe's order (key order for DBs, list order for ImageData, row order for HDF5) and wraps around
at the end, so batches span the wrap exactly like Caffe's. Work is split in two:

* one **reader** (the prefetch thread) walks the records in order, takes each image's random draws from the
  transformer's RNG in that same order, and assembles batches into a bounded queue (``prefetch`` batches
  ahead, Caffe's ``data_param.prefetch``, default 4);
* ``workers`` threads decode and transform the images of a batch in parallel (OpenCV and numpy release the
  GIL), each writing its images straight into the batch buffer.

Because the draws are taken by the reader, the results do not depend on how the workers are scheduled:
the same seed gives the same batches with 0, 1 or 8 workers. ``shard(rank, world)`` keeps the records whose
position ``i`` satisfies ``i % world == rank`` (Caffe's ``DataLayer::Skip`` under multi-GPU training; TEST
phase is not sharded, as in Caffe).

Seeds follow Caffe's setup order from one ``seed`` (``random_seed``; /dev/urandom when None): the main RNG
gives the transformer its seed (twice: Caffe's InitRand runs twice, the second wins), the list shuffle its
seed and ``rand_skip`` its draw.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import ResnetcError
from . import sources
from .datum import datum_to_array, hwc_to_chw, parse_datum
from .db import DBReader
from .rng import CaffeRNG
from .transformer import DataTransformer

log = logging.getLogger(__name__)

class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _torch():
    import torch

    return torch


class Pipeline:
    """Base class: background prefetching of batches from an ordered, wrapping record stream.

    Subclasses define ``tops`` (Caffe top names), ``batch_size``, ``_records()`` (an endless iterator of
    records in Caffe's order) and ``_make_batch(records)`` -> list of numpy arrays (one per top).
    """

    phase = "TEST"

    def __init__(self, *, prefetch: int = 4, workers: int = 2, pin_memory: bool = False, name: str = ""):
        self.prefetch = max(0, int(prefetch))
        self.workers = max(0, int(workers))
        self.pin_memory = pin_memory
        self.name = name
        self.rank, self.world = 0, 1
        self._queue = None
        self._thread = None
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"resnetc-data-{name}") \
            if self.workers > 1 else None
        self._stream = None
        self.context = None  # (file, line, layer name, layer type) of the prototxt layer, for errors

    # ---- public API
    def shard(self, rank: int, world: int) -> "Pipeline":
        """Read only records ``i % world == rank`` (TRAIN only, like Caffe). Call before the first batch."""
        if self._stream is not None:
            raise RuntimeError("shard() must be called before the first batch")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        self.rank, self.world = int(rank), int(world)
        return self

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.next_batch()

    def next_batch(self) -> dict:
        """The next batch: {top name: tensor} (data float32 NCHW, labels float32 (N,))."""
        if self.prefetch == 0:
            try:
                return self._to_tensors(self._produce())
            except ResnetcError as e:
                raise with_context(e, self.context) from None
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self._queue.put(item)  # every later call fails the same way
            if isinstance(item.exc, ResnetcError):
                raise with_context(item.exc, self.context) from None
            raise item.exc
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:  # unblock a reader waiting on a full queue
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop.set()
        except Exception:
            pass

    # ---- machinery
    def _sharded(self, records):
        if self.world == 1 or self.phase != "TRAIN":
            yield from records
            return
        for i, r in enumerate(records):
            if i % self.world == self.rank:
                yield r

    def _next_records(self) -> list:
        if self._stream is None:
            self._stream = self._sharded(self._records())
        return [next(self._stream) for _ in range(self.batch_size)]

    def _produce(self) -> list:
        return self._make_batch(self._next_records())

    def _to_tensors(self, arrays) -> dict:
        torch = _torch()
        out = {}
        for top, a in zip(self.tops, arrays):
            t = torch.from_numpy(a)
            if self.pin_memory and torch.cuda.is_available():
                t = t.pin_memory()
            out[top] = t
        return out

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._run, name=f"resnetc-prefetch-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._to_tensors(self._produce())
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer
            self._queue.put(_Failure(e))

    def _parallel(self, fn, items) -> list:
        """``[fn(i, item)]`` over the items, on the worker threads when there are several."""
        if self._pool is None or len(items) < 2:
            return [fn(i, it) for i, it in enumerate(items)]
        n = min(self.workers, len(items))
        bounds = np.linspace(0, len(items), n + 1).astype(int)

        def chunk(lo, hi):
            return [fn(i, items[i]) for i in range(lo, hi)]

        futures = [self._pool.submit(chunk, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        out = []
        for f in futures:
            out.extend(f.result())
        return out


def _seed_transformer(main: CaffeRNG, transformer: DataTransformer) -> None:
    if transformer.needs_rand:
        transformer.rng = CaffeRNG(main.raw())


class _ImagePipeline(Pipeline):
    """Shared by Data and ImageData: images -> DataTransformer -> (batch, C, H, W), labels (batch,)."""

    def _load(self, record):
        """-> (CHW uint8/float32 image, label, key) for one record (runs on a worker)."""
        raise NotImplementedError

    def _make_batch(self, records) -> list:
        draws = [self.transformer.draw() for _ in records]  # in record order, on the reader
        img0, label0, key0 = self._load(records[0])
        shape = self.transformer.output_shape(*img0.shape)
        data = np.empty((len(records),) + shape, dtype=np.float32)
        labels = np.empty((len(records),), dtype=np.float32)
        self.transformer.transform(img0, draws[0], source=self.source, key=key0, out=data[0])
        labels[0] = label0

        def one(i, record):
            img, label, key = self._load(record)
            got = self.transformer.output_shape(*img.shape)
            if got != shape:
                raise ResnetcError(f"record '{_s(key)}' gives a {_fmt(got)} image but the batch started with "
                                   f"record '{_s(key0)}' giving {_fmt(shape)}: all records of a batch must agree",
                                   file=self.source)
            self.transformer.transform(img, draws[i + 1], source=self.source, key=key, out=data[i + 1])
            labels[i + 1] = label

        self._parallel(one, records[1:])
        return [data, labels][:len(self.tops)]


def _s(key) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape)


class DataPipeline(_ImagePipeline):
    """``type: "Data"``: Datum records of an LMDB (or LevelDB) in key order."""

    def __init__(self, layer_param, *, phase: str = "TEST", tops=None, seed=None, base_dir=None, **kw):
        dp = layer_param.data_param
        super().__init__(prefetch=kw.pop("prefetch", dp.prefetch), name=layer_param.name, **kw)
        self.phase = phase.upper()
        self.tops = list(tops if tops is not None else layer_param.top)
        self.batch_size = _batch_size(dp.batch_size, layer_param)
        self.source = sources.resolve_path(dp.source, base_dir)
        tp = layer_param.transform_param
        self.transformer = DataTransformer(tp, self.phase, mean_file=_mean_path(tp, base_dir))
        main = CaffeRNG(seed)
        _seed_transformer(main, self.transformer)
        self.reader = DBReader(self.source, dp.backend)
        _seed_transformer(main, self.transformer)  # Caffe's second InitRand: this seed wins
        key, value = self.reader.first()
        img = self._load((key, value))[0]
        self.transformer.check(*img.shape, self.source, key)
        self.shape = (self.batch_size,) + self.transformer.output_shape(*img.shape)
        log.info("%s: output data size: %s", layer_param.name, ",".join(map(str, self.shape)))

    def _records(self):
        return self.reader.cycle()

    def _load(self, record):
        key, value = record
        datum = parse_datum(value, self.source, key)
        img = datum_to_array(datum, self.source, key, force_color=self.transformer.force_color,
                             force_gray=self.transformer.force_gray)
        return img, datum.label, key

    def close(self):
        super().close()
        self.reader.close()


class ImageDataPipeline(_ImagePipeline):
    """``type: "ImageData"``: a list file of ``path label`` lines, images read with OpenCV."""

    def __init__(self, layer_param, *, phase: str = "TEST", tops=None, seed=None, base_dir=None, **kw):
        p = layer_param.image_data_param
        super().__init__(prefetch=kw.pop("prefetch", 4), name=layer_param.name, **kw)
        self.phase = phase.upper()
        self.tops = list(tops if tops is not None else layer_param.top)
        self.batch_size = _batch_size(p.batch_size, layer_param)
        if (p.new_height > 0) != (p.new_width > 0):
            raise ResnetcError("image_data_param: new_height and new_width must both be 0 or both be > 0")
        self.p = p
        self.source = sources.resolve_path(p.source, base_dir)
        self.root = p.root_folder
        tp = layer_param.transform_param
        self.transformer = DataTransformer(tp, self.phase, mean_file=_mean_path(tp, base_dir))
        main = CaffeRNG(seed)
        _seed_transformer(main, self.transformer)
        self.lines = sources.read_list(self.source)
        self._shuffle_rng = None
        if p.shuffle:
            self._shuffle_rng = CaffeRNG(main.raw())
            self._shuffle_rng.shuffle(self.lines)
        log.info("%s: A total of %d images.", layer_param.name, len(self.lines))
        self.start = 0
        if p.rand_skip:
            self.start = main.raw() % p.rand_skip
            if self.start >= len(self.lines):
                raise ResnetcError(f"rand_skip draw {self.start} is not smaller than the {len(self.lines)} images",
                                   file=self.source)
            log.info("%s: Skipping first %d data points.", layer_param.name, self.start)
        _seed_transformer(main, self.transformer)
        img = self._load(self.lines[self.start])[0]
        self.shape = (self.batch_size,) + self.transformer.output_shape(*img.shape)

    def _records(self):
        i = self.start
        while True:
            while i < len(self.lines):
                yield self.lines[i]
                i += 1
            log.info("%s: Restarting data prefetching from start.", self.name)
            i = 0
            if self._shuffle_rng is not None:
                self._shuffle_rng.shuffle(self.lines)

    def _load(self, record):
        path, label, line = record
        img = sources.read_image(self.root + path, is_color=self.p.is_color, new_height=self.p.new_height,
                                 new_width=self.p.new_width, source=self.source, line=line)
        return hwc_to_chw(img), label, path


class HDF5DataPipeline(Pipeline):
    """``type: "HDF5Data"``: rows of the datasets named like the tops, file after file, wrapping."""

    def __init__(self, layer_param, *, phase: str = "TEST", tops=None, seed=None, base_dir=None, **kw):
        p = layer_param.hdf5_data_param
        super().__init__(prefetch=kw.pop("prefetch", 4), name=layer_param.name, **kw)
        if layer_param.HasField("transform_param"):
            raise ResnetcError("HDF5Data does not transform data: remove transform_param (Caffe refuses it too)")
        self.phase = phase.upper()
        self.tops = list(tops if tops is not None else layer_param.top)
        self.batch_size = _batch_size(p.batch_size, layer_param)
        self.source = sources.resolve_path(p.source, base_dir)
        self.files = [sources.resolve_path(f, os.path.dirname(self.source)) for f in sources.read_hdf5_list(self.source)]
        self.shuffle = p.shuffle
        self._rng = CaffeRNG(seed) if p.shuffle else None
        if self._rng is not None:
            self._rng.shuffle(self.files)
        first = sources.load_hdf5(self.files[0], self.tops, source=self.source)
        self._first = (self.files[0], first)
        self.shapes = [(self.batch_size,) + a.shape[1:] for a in first]

    def _records(self):
        files = list(self.files)
        while True:
            for path in files:
                if self._first is not None and self._first[0] == path:
                    arrays, self._first = self._first[1], None
                else:
                    arrays = sources.load_hdf5(path, self.tops, source=self.source)
                order = list(range(arrays[0].shape[0]))
                if self._rng is not None:
                    self._rng.shuffle(order)
                for r in order:
                    yield [a[r] for a in arrays]
            if self._rng is not None:
                self._rng.shuffle(files)

    def _make_batch(self, records) -> list:
        out = []
        for j, shape in enumerate(self.shapes):
            rows = [r[j] for r in records]
            for r in rows:
                if r.shape != shape[1:]:
                    raise ResnetcError(f"HDF5 dataset '{self.tops[j]}' changes row shape from {shape[1:]} to "
                                       f"{r.shape} between files", file=self.source)
            out.append(np.stack(rows).astype(np.float32, copy=False))
        return out


class MemoryDataPipeline(Pipeline):
    """``type: "MemoryData"``: arrays handed over from Python with :meth:`reset` (not transformed, as in
    Caffe's ``Reset``). Each batch is the next ``batch_size`` rows; ``n`` must be a multiple of it."""

    def __init__(self, layer_param, *, phase: str = "TEST", tops=None, seed=None, base_dir=None, **kw):
        p = layer_param.memory_data_param
        kw.pop("prefetch", None)
        super().__init__(prefetch=0, name=layer_param.name, **kw)
        self.phase = phase.upper()
        self.tops = list(tops if tops is not None else layer_param.top)
        self.batch_size = _batch_size(p.batch_size, layer_param)
        self.item_shape = (int(p.channels), int(p.height), int(p.width))
        self.shape = (self.batch_size,) + self.item_shape
        if layer_param.HasField("transform_param"):
            log.warning("%s: MemoryData arrays set from Python are not transformed (transform_param ignored)",
                        layer_param.name)
        self.data = self.labels = None
        self.pos = 0

    def reset(self, data, labels) -> None:
        data = np.ascontiguousarray(data, dtype=np.float32)
        labels = np.ascontiguousarray(labels, dtype=np.float32).reshape(-1)
        if data.ndim != 4 or data.shape[1:] != self.item_shape:
            raise ResnetcError(f"MemoryData '{self.name}': data has shape {data.shape}; expected "
                               f"(n, {', '.join(map(str, self.item_shape))})")
        if labels.shape[0] != data.shape[0]:
            raise ResnetcError(f"MemoryData '{self.name}': {data.shape[0]} images but {labels.shape[0]} labels")
        if data.shape[0] == 0 or data.shape[0] % self.batch_size:
            raise ResnetcError(f"MemoryData '{self.name}': the number of images ({data.shape[0]}) must be a positive "
                               f"multiple of batch_size {self.batch_size}")
        self.data, self.labels, self.pos = data, labels, 0

    def next_batch(self) -> dict:
        if self.data is None:
            raise ResnetcError(f"MemoryData '{self.name}': no data yet; call reset(data, labels) first")
        lo, hi = self.pos, self.pos + self.batch_size
        self.pos = hi % self.data.shape[0]
        return self._to_tensors([self.data[lo:hi], self.labels[lo:hi]][:len(self.tops)])


def with_context(e: ResnetcError, context) -> ResnetcError:
    """The error located at the prototxt layer (file, line, layer); a data source the error named (its
    ``file``) moves into the message, so the one line names both the layer and the source/record."""
    if context is None or e.layer is not None:
        return e
    file, line, name, type_ = context
    msg = f"{e.file}: {e.message}" if e.file else e.message
    if e.file and e.line:
        msg = f"{e.file}:{e.line}: {e.message}"
    return ResnetcError(msg, file=file, line=line, layer=name, layer_type=type_)


def _batch_size(n: int, layer_param) -> int:
    if n <= 0:
        raise ResnetcError(f"batch_size must be > 0 (got {n})")
    return int(n)


def _mean_path(tp, base_dir):
    return sources.resolve_path(tp.mean_file, base_dir) if tp.HasField("mean_file") else None


PIPELINES = {
    "Data": DataPipeline,
    "ImageData": ImageDataPipeline,
    "HDF5Data": HDF5DataPipeline,
    "MemoryData": MemoryDataPipeline,
}


def make_pipeline(layer, *, seed=None, workers: int = 2, prefetch=None, pin_memory: bool = False,
                  phase=None, base_dir=None) -> Pipeline:
    """The input pipeline of one data layer (a :class:`resnetc.graph.Layer`).

    Errors name the layer's file, line and name. ``base_dir`` (default: the prototxt's directory) is where a
    relative ``source`` is looked for when it is not found relative to the working directory.
    """
    cls = PIPELINES.get(layer.type)
    kw = dict(workers=workers, pin_memory=pin_memory)
    if prefetch is not None:
        kw["prefetch"] = prefetch
    if base_dir is None and getattr(layer, "file", None):
        base_dir = os.path.dirname(os.path.abspath(layer.file))
    context = (getattr(layer, "file", None), getattr(layer, "line", None), layer.name, layer.type)
    try:
        if cls is None:
            raise ResnetcError(f"{layer.type} layers are not supported by resnetc's input pipelines "
                               f"(supported: {', '.join(sorted(PIPELINES))})")
        pipe = cls(layer.param, phase=phase or layer.phase, tops=layer.caffe_tops, seed=seed, base_dir=base_dir,
                   **kw)
    except ResnetcError as e:
        raise with_context(e, context) from None
    pipe.context = context
    return pipe


def make_pipelines(graph, **kw) -> dict:
    """{layer name: pipeline} for every data layer of a LayerGraph."""
    return {layer.name: make_pipeline(layer, **kw) for layer in graph.layers if layer.is_data}
