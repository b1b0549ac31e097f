"""Dataset tools through the CLI, as a user runs them: convert-imageset (raw and encoded) -> LMDB -> Data
pipeline, compute-image-mean against numpy (and an independent BlobProto reader), CIFAR-10 binary and MNIST
IDX archives made here in their exact formats, the shipped digits, bad input and atomic writes."""
from __future__ import annotations

import gzip
import importlib.util
import io
import os
import struct
import tarfile

import numpy as np
import pytest

from resnetc.data import make_pipeline
from resnetc.data.datum import datum_to_array, parse_datum
from resnetc.data.db import DBReader
from resnetc.data.mean import read_mean
from resnetc.graph import build_graph

cv2 = pytest.importorskip("cv2")


def read_db(path):
    with DBReader(str(path)) as db:
        out = [(k, parse_datum(v, str(path), k)) for k, v in db.items()]
    return out


def make_images(root, n=6, gray=False, ext="png"):
    rs = np.random.RandomState(11)
    os.makedirs(root / "cls", exist_ok=True)
    imgs, lines = [], []
    for i in range(n):
        shape = (10, 12) if gray else (10, 12, 3)
        im = rs.randint(0, 256, size=shape).astype(np.uint8)
        cv2.imwrite(str(root / "cls" / f"im{i}.{ext}"), im)
        imgs.append(im)
        lines.append(f"cls/im{i}.{ext} {i % 3}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return imgs


def pipeline_batch(tmp_path, db, n):
    text = f"""layer {{ name: "data" type: "Data" top: "data" top: "label"
      data_param {{ source: "{db}" batch_size: {n} backend: LMDB }} }}"""
    (tmp_path / "net.prototxt").write_text(text)
    g = build_graph(str(tmp_path / "net.prototxt"), "TEST")
    with make_pipeline(g.layer("data"), workers=2) as p:
        return g, p.next_batch()


def test_convert_imageset_raw_round_trip(tmp_path, run_cli):
    imgs = make_images(tmp_path)
    r = run_cli("convert-imageset", f"{tmp_path}/", tmp_path / "list.txt", tmp_path / "db")
    assert r.returncode == 0, r.stderr
    recs = read_db(tmp_path / "db")
    assert [k for k, _ in recs] == [f"{i:08d}_cls/im{i}.png".encode() for i in range(6)]
    for (k, d), im in zip(recs, imgs):
        assert (d.channels, d.height, d.width, d.encoded) == (3, 10, 12, False)
    g, batch = pipeline_batch(tmp_path, "db", 6)
    assert g.shape("data") == (6, 3, 10, 12)
    np.testing.assert_array_equal(batch["data"].numpy(), np.stack([im.transpose(2, 0, 1) for im in imgs]))
    np.testing.assert_array_equal(batch["label"].numpy(), [0, 1, 2, 0, 1, 2])
    # mean: equal to numpy's mean of the same images (float32 accumulator, as Caffe)
    r = run_cli("compute-image-mean", tmp_path / "db", tmp_path / "mean.binaryproto")
    assert r.returncode == 0, r.stderr
    assert "mean_value channel [2]" in r.stderr
    want = np.stack([im.transpose(2, 0, 1) for im in imgs]).astype(np.float64).mean(0)
    np.testing.assert_allclose(read_mean(str(tmp_path / "mean.binaryproto")), want, rtol=1e-6)


def test_mean_file_readable_without_resnetc(tmp_path, run_cli, shared):
    make_images(tmp_path, gray=True)
    assert run_cli("convert-imageset", "--gray", f"{tmp_path}/", tmp_path / "list.txt", tmp_path / "db").returncode == 0
    assert run_cli("compute-image-mean", tmp_path / "db", tmp_path / "m.binaryproto").returncode == 0
    spec = importlib.util.spec_from_file_location("blobproto", os.path.join(shared, "conformance", "blobproto.py"))
    bp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bp)
    m = bp.read_blobproto(str(tmp_path / "m.binaryproto"))
    assert m.shape == (1, 1, 10, 12)  # legacy num/channels/height/width, as compute_image_mean writes
    np.testing.assert_array_equal(m[0], read_mean(str(tmp_path / "m.binaryproto")))


def test_convert_imageset_encoded(tmp_path, run_cli):
    imgs = make_images(tmp_path, ext="png")
    r = run_cli("convert-imageset", "--encoded", "--shuffle", "--seed", "3", f"{tmp_path}/", tmp_path / "list.txt",
                tmp_path / "db")
    assert r.returncode == 0, r.stderr
    recs = read_db(tmp_path / "db")
    files = {}
    for k, d in recs:
        name = k.decode().split("_", 1)[1]
        assert d.encoded
        assert d.data == (tmp_path / name).read_bytes()  # file bytes stored verbatim (png == png)
        files[name] = d
    assert [k[:8] for k, _ in recs] == [b"%08d" % i for i in range(6)]
    assert [k.decode().split("_", 1)[1] for k, _ in recs] != [f"cls/im{i}.png" for i in range(6)]  # shuffled
    # re-encoded as jpg with a resize: decoded pixels come back through the Data pipeline
    r = run_cli("convert-imageset", "--encode_type", "jpg", "--resize_height", "8", "--resize_width", "9",
                f"{tmp_path}/", tmp_path / "list.txt", tmp_path / "db2")
    assert r.returncode == 0, r.stderr
    recs = read_db(tmp_path / "db2")
    assert all(d.encoded and d.data[:2] == b"\xff\xd8" for _, d in recs)
    g, batch = pipeline_batch(tmp_path, "db2", 6)
    assert g.shape("data") == (6, 3, 8, 9)
    decoded = np.stack([cv2.imdecode(np.frombuffer(d.data, np.uint8), -1).transpose(2, 0, 1) for _, d in recs])
    np.testing.assert_array_equal(batch["data"].numpy(), decoded)
    # and the mean of encoded records decodes them
    assert run_cli("compute-image-mean", tmp_path / "db2", tmp_path / "m").returncode == 0
    np.testing.assert_allclose(read_mean(str(tmp_path / "m")), decoded.astype(np.float64).mean(0), rtol=1e-6)


def test_convert_imageset_bad_inputs_leave_nothing(tmp_path, run_cli):
    make_images(tmp_path, n=3)
    (tmp_path / "cls" / "bad.png").write_bytes(b"garbage")
    (tmp_path / "l_missing.txt").write_text("cls/im0.png 0\ncls/nope.png 1\n")
    (tmp_path / "l_bad.txt").write_text("cls/im0.png 0\ncls/im1.png 1\ncls/bad.png 2\n")
    for lst, what in (("l_missing.txt", "nope.png"), ("l_bad.txt", "bad.png")):
        r = run_cli("convert-imageset", f"{tmp_path}/", tmp_path / lst, tmp_path / "db")
        assert r.returncode == 2
        err = [l for l in r.stderr.splitlines() if l.startswith("resnetc: error:")]
        assert len(err) == 1 and what in err[0] and lst in err[0], r.stderr
        assert r.stderr.strip().splitlines()[-1] == err[0]
        assert "Traceback" not in r.stderr
        assert not os.path.exists(tmp_path / "db")
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".db")]  # no temp DB left
    r = run_cli("convert-imageset", "--skip-bad", f"{tmp_path}/", tmp_path / "l_bad.txt", tmp_path / "db")
    assert r.returncode == 0 and "Skipped 1" in r.stderr
    assert [k for k, _ in read_db(tmp_path / "db")] == [b"00000000_cls/im0.png", b"00000001_cls/im1.png"]
    # a failed run does not touch an existing DB
    before = read_db(tmp_path / "db")
    assert run_cli("convert-imageset", f"{tmp_path}/", tmp_path / "l_missing.txt", tmp_path / "db").returncode == 2
    assert read_db(tmp_path / "db") == before


def test_compute_image_mean_bad_inputs(tmp_path, run_cli):
    r = run_cli("compute-image-mean", tmp_path / "nothing", tmp_path / "m")
    assert r.returncode == 2 and "nothing" in r.stderr and "not found" in r.stderr
    assert not os.path.exists(tmp_path / "m")


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10 / MNIST archives in their exact formats


def _cifar_records(rs, n):
    labels = rs.randint(0, 10, n).astype(np.uint8)
    pix = rs.randint(0, 256, (n, 3072)).astype(np.uint8)
    return labels, pix, np.concatenate([labels[:, None], pix], 1).tobytes()


def test_cifar10_binary_archive(tmp_path, run_cli):
    rs = np.random.RandomState(8)
    parts, buf = {}, io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, n in [(f"data_batch_{i}.bin", 3 + i) for i in range(1, 6)] + [("test_batch.bin", 4)]:
            labels, pix, raw = _cifar_records(rs, n)
            parts[name] = (labels, pix)
            info = tarfile.TarInfo("cifar-10-batches-bin/" + name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(buf.getvalue())
    r = run_cli("data", "cifar10", tmp_path / "cifar-10-binary.tar.gz", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    train_l = np.concatenate([parts[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    train_x = np.concatenate([parts[f"data_batch_{i}.bin"][1] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    for split, (x, y) in (("train", (train_x, train_l)), ("test", (parts["test_batch.bin"][1].reshape(-1, 3, 32, 32),
                                                                  parts["test_batch.bin"][0]))):
        recs = read_db(tmp_path / "out" / f"cifar10_{split}_lmdb")
        assert [k for k, _ in recs] == [b"%05d" % i for i in range(len(x))]
        np.testing.assert_array_equal(np.stack([datum_to_array(d, "", k) for k, d in recs]), x)
        np.testing.assert_array_equal([d.label for _, d in recs], y)
    np.testing.assert_allclose(read_mean(str(tmp_path / "out" / "mean.binaryproto")),
                               train_x.astype(np.float64).mean(0), rtol=1e-6)
    # a truncated batch file is refused with its name
    (tmp_path / "dir" / "cifar-10-batches-bin").mkdir(parents=True)
    for i in range(1, 6):
        (tmp_path / "dir" / "cifar-10-batches-bin" / f"data_batch_{i}.bin").write_bytes(b"\0" * 3073)
    (tmp_path / "dir" / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(b"\0" * 3000)
    r = run_cli("data", "cifar10", tmp_path / "dir", tmp_path / "out2")
    assert r.returncode == 2 and "test_batch.bin" in r.stderr and "3073" in r.stderr


def _idx(images=None, labels=None):
    if images is not None:
        n, h, w = images.shape
        return struct.pack(">iiii", 2051, n, h, w) + images.tobytes()
    return struct.pack(">ii", 2049, len(labels)) + labels.tobytes()


def test_mnist_idx(tmp_path, run_cli):
    rs = np.random.RandomState(9)
    src = tmp_path / "mnist"
    src.mkdir()
    data = {}
    for split, prefix, n in (("train", "train", 7), ("test", "t10k", 3)):
        x = rs.randint(0, 256, (n, 28, 28)).astype(np.uint8)
        y = rs.randint(0, 10, n).astype(np.uint8)
        data[split] = (x, y)
        (src / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images=x)))
        (src / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels=y))
    r = run_cli("data", "mnist", src, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    for split, (x, y) in data.items():
        recs = read_db(tmp_path / "out" / f"mnist_{split}_lmdb")
        assert [k for k, _ in recs] == [b"%08d" % i for i in range(len(x))]
        np.testing.assert_array_equal(np.stack([datum_to_array(d, "", k) for k, d in recs]), x[:, None])
        np.testing.assert_array_equal([d.label for _, d in recs], y)
    (src / "t10k-labels-idx1-ubyte").write_bytes(_idx(labels=np.zeros(2, np.uint8)))
    r = run_cli("data", "mnist", src, tmp_path / "out3")
    assert r.returncode == 2 and "3 images but 2 labels" in r.stderr


# ---------------------------------------------------------------------------------------------------------
# the shipped digits


def test_digits(tmp_path, run_cli):
    from resnetc.data.digits import load_digits

    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    r = run_cli("data", "digits", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    train, test = read_db(tmp_path / "d" / "digits_train_lmdb"), read_db(tmp_path / "d" / "digits_test_lmdb")
    assert (len(train), len(test)) == (1437, 360)
    idx = np.arange(1797)
    test_x = (images[idx % 5 == 0].astype(np.int64) * 255 + 8) // 16
    np.testing.assert_array_equal(np.stack([datum_to_array(d, "", k)[0] for k, d in test]), test_x)
    np.testing.assert_array_equal([d.label for _, d in test], labels[idx % 5 == 0])
    r = run_cli("data", "digits", "--classes", "5-9", "--relabel", tmp_path / "d2")
    assert r.returncode == 0, r.stderr
    labs = [d.label for _, d in read_db(tmp_path / "d2" / "digits_train_lmdb")]
    assert sorted(set(labs)) == [0, 1, 2, 3, 4]
    assert len(labs) == int(((labels >= 5) & (idx % 5 != 0)).sum())
    assert (tmp_path / "d2" / "labels.txt").read_text() == "5\n6\n7\n8\n9\n"
    assert (tmp_path / "d" / "labels.txt").read_text() == "".join(f"{d}\n" for d in range(10))
    r = run_cli("data", "digits", "--classes", "3-12", tmp_path / "d3")
    assert r.returncode == 2 and "within 0-9" in r.stderr
    assert not (tmp_path / "d3").exists()


def test_digits_class_subsets(tmp_path, run_cli):
    """--classes 1,3,7-8 --relabel: labels 0..3 in digit order, the images of exactly those digits, named in
    labels.txt; without --relabel the digit stays the label."""
    from resnetc.data.digits import load_digits

    images, labels = load_digits()
    idx = np.arange(1797)
    r = run_cli("data", "digits", "--classes", "8,1,3,7-8", "--relabel", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s" / "labels.txt").read_text().split() == ["1", "3", "7", "8"]
    recs = read_db(tmp_path / "s" / "digits_test_lmdb")
    sel = np.isin(labels, [1, 3, 7, 8]) & (idx % 5 == 0)
    digit_of = {0: 1, 1: 3, 2: 7, 3: 8}
    assert [digit_of[d.label] for _, d in recs] == labels[sel].tolist()
    want = (images[sel].astype(np.int64) * 255 + 8) // 16
    np.testing.assert_array_equal(np.stack([datum_to_array(d, "", k)[0] for k, d in recs]), want)
    r = run_cli("data", "digits", "--classes", "7-8", tmp_path / "k")
    assert r.returncode == 0, r.stderr
    assert sorted({d.label for _, d in read_db(tmp_path / "k" / "digits_train_lmdb")}) == [7, 8]
    r = run_cli("data", "digits", "--classes", "a-b", tmp_path / "bad")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "expected digits and ranges" in r.stderr
