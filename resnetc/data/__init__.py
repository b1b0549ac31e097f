"""Caffe's data: Datum records in LMDB/LevelDB, image lists, HDF5, in-memory arrays; the DataTransformer;
the input pipelines that feed a CaffeNet; and the dataset tools (convert-imageset, compute-image-mean,
CIFAR-10, MNIST, the shipped UCI digits). See CAFFE_SEMANTICS.md §6.
"""
from .datum import array_to_datum, datum_to_array, encoded_datum, parse_datum  # noqa: F401
from .db import DBReader, write_db  # noqa: F401
from .mean import compute_image_mean, read_mean, write_mean  # noqa: F401
from .pipeline import (DataPipeline, HDF5DataPipeline, ImageDataPipeline, MemoryDataPipeline,  # noqa: F401
                       Pipeline, make_pipeline, make_pipelines)
from .rng import CaffeRNG  # noqa: F401
from .transformer import DataTransformer  # noqa: F401
