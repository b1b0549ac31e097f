"""Data layers: Data, ImageData, HDF5Data, MemoryData, WindowData (CAFFE_SEMANTICS.md §6).

They are not lowered to modules (``lower=None``): their tops are keyword inputs of the CaffeNet, fed by the
input pipelines of :mod:`resnetc.data.pipeline`. The shape rule gives Caffe's top shapes from the layer's
parameters and, when the data source exists, from its first record: ``(batch_size, C, crop or H, crop or W)``
and labels ``(batch_size,)``. When the source is not here, the dims it would give are ``None`` (or the
shapes declared in ``resnetc { top_shape {...} }``).
"""
from __future__ import annotations

import os

from ..errors import ResnetcError
from .registry import ShapeError, register


def _base_dir(layer):
    return os.path.dirname(os.path.abspath(layer.file)) if getattr(layer, "file", None) else None


def _declared(layer, n_tops):
    """Shapes from ``resnetc { top_shape }`` (one per top), or None."""
    if not layer.param.HasField("resnetc") or not layer.param.resnetc.top_shape:
        return None
    shapes = [tuple(int(d) for d in s.dim) for s in layer.param.resnetc.top_shape]
    if len(shapes) != n_tops:
        raise ShapeError(f"resnetc.top_shape gives {len(shapes)} shapes for {n_tops} tops")
    return shapes


def _source_error(e: ResnetcError) -> ShapeError:
    """A data-source error as a shape error: the graph adds the prototxt's file, line and layer, the
    source (and record) stay in the message."""
    where = f"{e.file}:{e.line}: " if e.file and e.line else (f"{e.file}: " if e.file else "")
    return ShapeError(where + e.message)


def _image_tops(layer, batch, image_chw, n_tops, crop):
    c, h, w = image_chw
    if crop:
        h = w = crop
    return [(batch, c, h, w), (batch,)][:n_tops]


# ---- Data -------------------------------------------------------------------------------------------------


def _data_shape(layer, bottoms):
    from ..data import sources
    from ..data.datum import datum_to_array, parse_datum
    from ..data.db import DBReader

    dp, tp = layer.param.data_param, layer.param.transform_param
    n = len(layer.tops)
    source = sources.resolve_path(dp.source, _base_dir(layer))
    crop = int(tp.crop_size)
    if not dp.source or not os.path.exists(source):
        declared = _declared(layer, n)
        if declared:
            return declared
        return _image_tops(layer, int(dp.batch_size), (None, None, None), n, crop)
    try:
        with DBReader(source, dp.backend) as db:
            key, value = db.first()
            img = datum_to_array(parse_datum(value, source, key), source, key,
                                 force_color=tp.force_color, force_gray=tp.force_gray)
    except ResnetcError as e:
        raise _source_error(e) from None
    c, h, w = img.shape
    if crop and (h < crop or w < crop):
        raise ShapeError(f"crop_size {crop} is larger than the {h}x{w} images of {source}")
    return _image_tops(layer, int(dp.batch_size), img.shape, n, crop)


def _transform_check(layer):
    tp = layer.param.transform_param
    if tp.force_color and tp.force_gray:
        raise ShapeError("transform_param: force_color and force_gray cannot both be set")
    if tp.HasField("mean_file") and len(tp.mean_value):
        raise ShapeError("transform_param: cannot specify mean_file and mean_value at the same time")


register("Data", shape=_data_shape, check=_transform_check, bottoms=(0, 0), tops=(1, 2), data=True, lower=None,
         family="data", doc="Datum records of an LMDB/LevelDB in key order, through the DataTransformer")


# ---- ImageData --------------------------------------------------------------------------------------------


def _image_data_check(layer):
    _transform_check(layer)
    p = layer.param.image_data_param
    if (p.new_height > 0) != (p.new_width > 0):
        raise ShapeError("image_data_param: new_height and new_width must both be 0 or both be > 0")


def _image_data_shape(layer, bottoms):
    from ..data import sources

    p, tp = layer.param.image_data_param, layer.param.transform_param
    source = sources.resolve_path(p.source, _base_dir(layer))
    crop = int(tp.crop_size)
    c = 3 if p.is_color else 1
    if not p.source or not os.path.exists(source):
        declared = _declared(layer, 2)
        if declared:
            return declared
        h = p.new_height or None
        w = p.new_width or None
        return _image_tops(layer, int(p.batch_size), (c, h, w), 2, crop)
    try:
        lines = sources.read_list(source)
        first = lines[0]  # Caffe shuffles before reading the first image, but all images give C, and the
        # sizes come from new_height/new_width or the images (which Caffe requires to agree within a batch)
        img = sources.read_image(p.root_folder + first[0], is_color=p.is_color, new_height=p.new_height,
                                 new_width=p.new_width, source=source, line=first[2])
    except ResnetcError as e:
        raise _source_error(e) from None
    h, w = img.shape[:2]
    if crop and (h < crop or w < crop):
        raise ShapeError(f"crop_size {crop} is larger than the {h}x{w} image '{first[0]}' of {source}")
    return _image_tops(layer, int(p.batch_size), (c, h, w), 2, crop)


register("ImageData", shape=_image_data_shape, check=_image_data_check, bottoms=(0, 0), tops=(2, 2), data=True,
         lower=None, family="data", doc="images named by a list file (path label), read with OpenCV")


# ---- HDF5Data ---------------------------------------------------------------------------------------------


def _hdf5_check(layer):
    if layer.param.HasField("transform_param"):
        raise ShapeError("HDF5Data does not transform data: remove transform_param (Caffe refuses it too)")


def _hdf5_shape(layer, bottoms):
    from ..data import sources

    p = layer.param.hdf5_data_param
    source = sources.resolve_path(p.source, _base_dir(layer))
    names = list(layer.caffe_tops)
    if not p.source or not os.path.exists(source):
        return _declared(layer, len(names)) or [None] * len(names)
    try:
        rows = sources.hdf5_first_shapes(source, names)
    except ResnetcError as e:
        raise _source_error(e) from None
    return [(int(p.batch_size),) + tuple(r) for r in rows]


register("HDF5Data", shape=_hdf5_shape, check=_hdf5_check, bottoms=(0, 0), tops=(1, None), data=True, lower=None,
         family="data", doc="rows of HDF5 datasets named like the tops")


# ---- MemoryData -------------------------------------------------------------------------------------------


def _memory_shape(layer, bottoms):
    p = layer.param.memory_data_param
    return [(int(p.batch_size), int(p.channels), int(p.height), int(p.width)), (int(p.batch_size),)]


register("MemoryData", shape=_memory_shape, bottoms=(0, 0), tops=(2, 2), data=True, lower=None, family="data",
         doc="arrays handed over from Python")


# ---- WindowData -------------------------------------------------------------------------------------------


def _window_shape(layer, bottoms):
    p = layer.param.window_data_param
    crop = int(layer.param.transform_param.crop_size or p.crop_size) or None
    return [(int(p.batch_size), 3, crop, crop), (int(p.batch_size),)]


register("WindowData", shape=_window_shape, bottoms=(0, 0), tops=(2, 2), data=True, lower=None, family="data",
         doc="R-CNN window files (shapes only: resnetc cannot read its data)")
