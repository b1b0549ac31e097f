"""Data layers: LMDB reading in key order with wrap-around, the input pipelines (determinism, workers,
sharding), ImageData/HDF5Data/MemoryData, the registry's shape rules, the oracle's solver data set, and bad
input (one clear error naming the source and the record)."""
from __future__ import annotations

import hashlib
import importlib.util
import os

import numpy as np
import pytest

from resnetc.data import make_pipeline
from resnetc.data.datum import array_to_datum, encoded_datum, encode_image
from resnetc.data.db import DBReader, write_db
from resnetc.data.mean import write_mean
from resnetc.errors import ResnetcError
from resnetc.graph import build_graph
from resnetc.prototxt import parse_net_text
from resnetc.proto import caffe_pb2

cv2 = pytest.importorskip("cv2")


def write_lmdb(path, records):
    """records: [(key bytes, Datum)]"""
    with write_db(str(path)) as db:
        for k, d in records:
            db.put(k, d.SerializeToString())


def net_file(tmp_path, text, name="net.prototxt"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def pipe_for(path, phase="TEST", **kw):
    g = build_graph(path, phase)
    return make_pipeline(next(l for l in g.layers if l.is_data), **kw), g


# ---------------------------------------------------------------------------------------------------------
# the oracle's solver data set (../shared/oracle/scripts/make_lmdb.py)

TRAIN_SHA = "ec6a9fd9cd474a6bbc0fed7f666104323f704318af13c6b3fa74b6907167f5b3"
TEST_SHA = "002ef40c144110fb673077caf082f1f7f1f24b6cd23ff379e0ebbe21988f030f"


def oracle_arrays():
    """Re-made from the description in make_lmdb.py / oracle README (b), independently of the script."""
    n = 320
    imgs = np.random.RandomState(12345).randint(0, 64, size=(n, 1, 28, 28)).astype(np.int32)
    labels = (np.arange(n) * 7 + 3) % 10
    for g in range(n):
        lab = labels[g]
        if lab < 5:
            imgs[g, 0, 2 + 5 * lab:2 + 5 * lab + 4, :] += 160
        else:
            imgs[g, 0, :, 2 + 5 * (lab - 5):2 + 5 * (lab - 5) + 4] += 160
    imgs = np.clip(imgs, 0, 255).astype(np.uint8)
    return (imgs[:256], labels[:256].astype(np.int64)), (imgs[256:], labels[256:].astype(np.int64))


def test_oracle_solver_lmdb(oracle, tmp_path):
    (trx, try_), (tex, tey) = oracle_arrays()
    assert hashlib.sha256(trx.tobytes() + try_.astype("<i8").tobytes()).hexdigest() == TRAIN_SHA
    assert hashlib.sha256(tex.tobytes() + tey.astype("<i8").tobytes()).hexdigest() == TEST_SHA
    # the LMDBs written by the oracle's own script (hand-encoded Datums), read by us
    spec = importlib.util.spec_from_file_location("make_lmdb", os.path.join(oracle, "scripts", "make_lmdb.py"))
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    mk.write_lmdb(str(tmp_path / "train_lmdb"), trx, try_)
    mk.write_lmdb(str(tmp_path / "test_lmdb"), tex, tey)
    src = parse_net_text(open(os.path.join(oracle, "solver", "train_val.prototxt")).read())
    data_only = caffe_pb2.NetParameter(name=src.param.name)
    data_only.layer.extend(l for l in src.param.layer if l.type == "Data")
    from resnetc.prototxt import to_text
    path = net_file(tmp_path, to_text(data_only))
    for phase, (x, y) in (("TRAIN", (trx, try_)), ("TEST", (tex, tey))):
        g = build_graph(path, phase)
        assert g.shape("data") == (32, 1, 28, 28) and g.shape("label") == (32,)
        with make_pipeline(g.layer("data"), workers=2) as p:
            n = len(x)
            for b in range(n // 32 + 2):  # past the end: Caffe restarts from the first key
                batch = p.next_batch()
                idx = np.arange(b * 32, b * 32 + 32) % n
                np.testing.assert_array_equal(batch["data"].numpy(),
                                              x[idx].astype(np.float32) * np.float32(0.00390625))
                np.testing.assert_array_equal(batch["label"].numpy(), y[idx].astype(np.float32))


# ---------------------------------------------------------------------------------------------------------
# Data layer over our own LMDBs


def make_raw_db(path, n=10, shape=(3, 6, 8), seed=0):
    rs = np.random.RandomState(seed)
    imgs = rs.randint(0, 256, size=(n,) + shape).astype(np.uint8)
    recs = [(b"%08d" % i, array_to_datum(imgs[i], i % 4)) for i in range(n)]
    write_lmdb(path, recs[::-1])  # inserted backwards: the reader must go by key order
    return imgs


DATA_NET = """
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ {tp} }}
  data_param {{ source: "{src}" batch_size: {bs} backend: LMDB }} }}
"""


def test_key_order_wrap_and_shapes(tmp_path):
    imgs = make_raw_db(tmp_path / "db", n=10)
    path = net_file(tmp_path, DATA_NET.format(tp="scale: 2", src="db", bs=4))  # relative to the prototxt
    p, g = pipe_for(path, prefetch=0)
    assert g.shape("data") == (4, 3, 6, 8)
    seen = np.concatenate([p.next_batch()["data"].numpy() for _ in range(5)])
    order = np.arange(20) % 10  # batches span the wrap
    np.testing.assert_array_equal(seen, imgs[order].astype(np.float32) * 2)


def test_deterministic_across_workers_and_prefetch(tmp_path):
    make_raw_db(tmp_path / "db", n=13, shape=(3, 10, 12))
    path = net_file(tmp_path, DATA_NET.format(tp="crop_size: 7 mirror: true mean_value: 100", src="db", bs=5))
    runs = []
    for workers, prefetch in ((0, 0), (1, 2), (3, 4)):
        p, _ = pipe_for(path, "TRAIN", seed=42, workers=workers, prefetch=prefetch)
        with p:
            runs.append([p.next_batch()["data"].numpy() for _ in range(6)])
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            np.testing.assert_array_equal(a, b)
    p, _ = pipe_for(path, "TRAIN", seed=43, prefetch=0)
    assert not np.array_equal(p.next_batch()["data"].numpy(), runs[0][0])


def test_shard_round_robin(tmp_path):
    imgs = make_raw_db(tmp_path / "db", n=7, shape=(1, 2, 2))
    path = net_file(tmp_path, DATA_NET.format(tp="", src="db", bs=3))
    g = build_graph(path, "TRAIN")
    got = {}
    for rank in range(2):
        p = make_pipeline(g.layer("data"), prefetch=0).shard(rank, 2)
        got[rank] = np.concatenate([p.next_batch()["data"].numpy() for _ in range(3)])
    # record i (counting across wraps, like Caffe's offset_) goes to rank i % 2
    stream = np.arange(18) % 7
    np.testing.assert_array_equal(got[0], imgs[stream[0::2]].astype(np.float32))
    np.testing.assert_array_equal(got[1], imgs[stream[1::2]].astype(np.float32))
    gt = build_graph(path, "TEST")  # TEST is not sharded (Caffe: only rank 0 tests)
    p = make_pipeline(gt.layer("data"), prefetch=0).shard(1, 2)
    np.testing.assert_array_equal(p.next_batch()["data"].numpy(), imgs[:3].astype(np.float32))


def test_encoded_datums_and_force_flags(tmp_path):
    rs = np.random.RandomState(1)
    bgr = rs.randint(0, 256, size=(5, 6, 3)).astype(np.uint8)
    grey = rs.randint(0, 256, size=(5, 6)).astype(np.uint8)
    write_lmdb(tmp_path / "c", [(b"0", encoded_datum(encode_image(bgr, "png"), 3))])
    write_lmdb(tmp_path / "g", [(b"0", encoded_datum(encode_image(grey, "png"), 1))])
    for db, tp, want in (("c", "", bgr.transpose(2, 0, 1)),
                         ("g", "", grey[None]),
                         ("g", "force_color: true", np.repeat(grey[None], 3, 0)),
                         # Caffe decodes with imdecode(..., IMREAD_GRAYSCALE) (its own rounding, not cvtColor's)
                         ("c", "force_gray: true",
                          cv2.imdecode(np.frombuffer(encode_image(bgr, "png"), np.uint8), cv2.IMREAD_GRAYSCALE)[None])):
        path = net_file(tmp_path, DATA_NET.format(tp=tp, src=db, bs=2))
        p, g = pipe_for(path, prefetch=0)
        assert g.shape("data") == (2,) + want.shape
        batch = p.next_batch()
        np.testing.assert_array_equal(batch["data"].numpy()[1], want.astype(np.float32))
        np.testing.assert_array_equal(batch["label"].numpy(), [3 if db == "c" else 1] * 2)


def test_mean_file_in_pipeline(tmp_path):
    imgs = make_raw_db(tmp_path / "db", n=4, shape=(2, 5, 5))
    mean = np.random.RandomState(2).uniform(0, 255, (2, 5, 5)).astype(np.float32)
    write_mean(str(tmp_path / "mean.binaryproto"), mean)
    path = net_file(tmp_path, DATA_NET.format(tp='mean_file: "mean.binaryproto" crop_size: 3 scale: 0.5',
                                              src="db", bs=4))
    p, _ = pipe_for(path, prefetch=0)
    want = (imgs[:, :, 1:4, 1:4].astype(np.float32) - mean[:, 1:4, 1:4]) * np.float32(0.5)
    np.testing.assert_array_equal(p.next_batch()["data"].numpy(), want)


def test_source_absent_gives_none_dims(tmp_path):
    path = net_file(tmp_path, DATA_NET.format(tp="crop_size: 227", src="nowhere_lmdb", bs=16))
    g = build_graph(path, "TEST")
    assert g.shape("data") == (16, None, 227, 227) and g.shape("label") == (16,)
    img = """layer { name: "d" type: "ImageData" top: "data" top: "label"
      image_data_param { source: "nowhere.txt" batch_size: 2 new_height: 40 new_width: 30 is_color: false } }"""
    g = build_graph(net_file(tmp_path, img, "i.prototxt"), "TEST")
    assert g.shape("data") == (2, 1, 40, 30)
    with pytest.raises(ResnetcError) as e:
        make_pipeline(build_graph(path, "TEST").layer("data"))
    assert "nowhere_lmdb" in str(e.value) and "layer 'data'" in str(e.value) and "net.prototxt:2" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# bad input: one line naming the source and the record


def test_empty_and_missing_lmdb(tmp_path):
    write_lmdb(tmp_path / "empty", [])
    with pytest.raises(ResnetcError, match="no records") as e:
        DBReader(str(tmp_path / "empty"))
    assert "empty" in str(e.value)
    with pytest.raises(ResnetcError, match="not found"):
        DBReader(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "notdb")
    with pytest.raises(ResnetcError, match="not an LMDB"):
        DBReader(str(tmp_path / "notdb"))


def test_leveldb_without_plyvel(tmp_path):
    try:
        import plyvel  # noqa: F401
        pytest.skip("plyvel is installed")
    except ImportError:
        pass
    os.makedirs(tmp_path / "ldb")
    with pytest.raises(ResnetcError, match="plyvel") as e:
        DBReader(str(tmp_path / "ldb"), "leveldb")
    assert "ldb" in str(e.value)


def test_datum_size_disagrees_with_header(tmp_path):
    bad = caffe_pb2.Datum(channels=1, height=4, width=4, data=b"\0" * 15, label=0)
    good = array_to_datum(np.zeros((1, 4, 4), np.uint8))
    write_lmdb(tmp_path / "db", [(b"00000000", good), (b"00000001", bad)])
    path = net_file(tmp_path, DATA_NET.format(tp="", src="db", bs=2))
    p, _ = pipe_for(path, workers=2)
    with pytest.raises(ResnetcError) as e:
        p.next_batch()
    msg = str(e.value)
    assert "00000001" in msg and "15 bytes" in msg and "1x4x4 = 16" in msg and "db" in msg
    assert "layer 'data'" in msg and "\n" not in msg
    p.close()


def test_undecodable_and_garbage_records(tmp_path):
    write_lmdb(tmp_path / "db", [(b"a", encoded_datum(b"\x89PNG not really", 0))])
    path = net_file(tmp_path, DATA_NET.format(tp="", src="db", bs=1))
    with pytest.raises(ResnetcError, match="record 'a': could not decode"):
        build_graph(path, "TEST")  # the shape rule reads the first record
    with write_db(str(tmp_path / "junk")) as db:
        db.put(b"k1", b"\xff\xff\xff")
    with pytest.raises(ResnetcError, match="record 'k1': not a Caffe Datum"):
        build_graph(net_file(tmp_path, DATA_NET.format(tp="", src="junk", bs=1), "j.prototxt"))


# ---------------------------------------------------------------------------------------------------------
# ImageData, HDF5Data, MemoryData


def test_image_data_list(tmp_path):
    rs = np.random.RandomState(4)
    os.makedirs(tmp_path / "img dir")
    imgs = []
    lines = []
    for i in range(5):
        im = rs.randint(0, 256, size=(9, 11, 3)).astype(np.uint8)
        cv2.imwrite(str(tmp_path / "img dir" / f"a {i}.png"), im)
        imgs.append(im)
        lines.append(f"img dir/a {i}.png {i * 2}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    text = f"""layer {{ name: "d" type: "ImageData" top: "data" top: "label"
      transform_param {{ crop_size: 5 }}
      image_data_param {{ source: "list.txt" batch_size: 3 root_folder: "{tmp_path}/" }} }}"""
    path = net_file(tmp_path, text)
    p, g = pipe_for(path, prefetch=0)
    assert g.shape("data") == (3, 3, 5, 5)
    b1, b2 = p.next_batch(), p.next_batch()
    order = [0, 1, 2, 3, 4, 0]
    data = np.concatenate([b1["data"].numpy(), b2["data"].numpy()])
    for j, i in enumerate(order):
        np.testing.assert_array_equal(data[j], imgs[i].transpose(2, 0, 1)[:, 2:7, 3:8].astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([b1["label"], b2["label"]]), [2 * i for i in order])
    # resize happens before the crop; shuffle is deterministic under a seed and a permutation
    text2 = text.replace('batch_size: 3', 'batch_size: 5 new_height: 7 new_width: 6 shuffle: true')
    p2, g2 = pipe_for(net_file(tmp_path, text2, "n2.prototxt"), seed=9, prefetch=0)
    assert g2.shape("data") == (5, 3, 5, 5)
    labels = p2.next_batch()["label"].numpy()
    assert sorted(labels.tolist()) == [0, 2, 4, 6, 8]
    p3, _ = pipe_for(net_file(tmp_path, text2, "n2.prototxt"), seed=9, prefetch=0)
    np.testing.assert_array_equal(p3.next_batch()["label"].numpy(), labels)


def test_image_data_missing_and_bad_image(tmp_path):
    cv2.imwrite(str(tmp_path / "ok.png"), np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "list.txt").write_text("ok.png 0\nmissing.png 1\nbad.png 2\n")
    text = f"""layer {{ name: "d" type: "ImageData" top: "data" top: "label"
      image_data_param {{ source: "list.txt" batch_size: 2 root_folder: "{tmp_path}/" }} }}"""
    p, _ = pipe_for(net_file(tmp_path, text), prefetch=0)
    with pytest.raises(ResnetcError) as e:
        p.next_batch()
    assert "missing.png" in str(e.value) and "list.txt:2" in str(e.value) and "could not open or find" in str(e.value)
    with pytest.raises(ResnetcError) as e:
        p.next_batch()
    assert "bad.png" in str(e.value) and "list.txt:3" in str(e.value) and "could not decode" in str(e.value)


def test_hdf5_data(tmp_path):
    h5py = pytest.importorskip("h5py")
    rs = np.random.RandomState(5)
    a = rs.randn(3, 2, 4).astype(np.float32)
    b = rs.randn(4, 2, 4).astype(np.float32)
    for name, x in (("a.h5", a), ("b.h5", b)):
        with h5py.File(tmp_path / name, "w") as f:
            f["data"] = x
            f["y"] = np.arange(len(x), dtype=np.int32) + (10 if name == "b.h5" else 0)
    (tmp_path / "files.txt").write_text(f"{tmp_path}/a.h5\n{tmp_path}/b.h5\n")
    text = """layer { name: "h" type: "HDF5Data" top: "data" top: "y"
      hdf5_data_param { source: "files.txt" batch_size: 5 } }"""
    p, g = pipe_for(net_file(tmp_path, text), prefetch=2)
    assert g.shape("data") == (5, 2, 4) and g.shape("y") == (5,)
    with p:
        got = [p.next_batch() for _ in range(3)]
    rows = np.concatenate([a, b])
    ys = np.array([0, 1, 2, 10, 11, 12, 13], np.float32)
    idx = np.arange(15) % 7  # batches span files and wrap to the first
    np.testing.assert_array_equal(np.concatenate([x["data"].numpy() for x in got]), rows[idx])
    np.testing.assert_array_equal(np.concatenate([x["y"].numpy() for x in got]), ys[idx])
    with pytest.raises(ResnetcError, match="no dataset 'label'"):
        build_graph(net_file(tmp_path, text.replace('"y"', '"label"'), "n2.prototxt"))


def test_memory_data():
    text = """layer { name: "m" type: "MemoryData" top: "data" top: "label"
      memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }"""
    g = build_graph(parse_net_text(text), "TEST")
    assert g.shape("data") == (2, 1, 2, 3) and g.shape("label") == (2,)
    p = make_pipeline(g.layer("m"))
    with pytest.raises(ResnetcError, match="reset"):
        p.next_batch()
    x = np.arange(24, dtype=np.float32).reshape(4, 1, 2, 3)
    p.reset(x, [0, 1, 2, 3])
    outs = [p.next_batch() for _ in range(3)]
    np.testing.assert_array_equal(outs[2]["data"].numpy(), x[:2])
    np.testing.assert_array_equal(outs[1]["label"].numpy(), [2, 3])
    with pytest.raises(ResnetcError, match="multiple of batch_size"):
        p.reset(x[:3], [0, 1, 2])


def test_window_data_shapes_only(tmp_path):
    text = """layer { name: "w" type: "WindowData" top: "data" top: "label"
      transform_param { crop_size: 227 } window_data_param { source: "w.txt" batch_size: 8 } }"""
    g = build_graph(parse_net_text(text), "TRAIN")
    assert g.shape("data") == (8, 3, 227, 227)
    with pytest.raises(ResnetcError, match="WindowData layers are not supported"):
        make_pipeline(g.layer("w"))
