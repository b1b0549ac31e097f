"""Caffe's DataTransformer: exact order of draws and arithmetic (CAFFE_SEMANTICS.md §6.2), checked against a
literal per-element port of ``DataTransformer::Transform(const Datum&, Dtype*)`` driven by numpy's Mersenne
Twister (boost::mt19937's raw stream)."""
from __future__ import annotations

import numpy as np
import pytest

from resnetc.data.rng import CaffeRNG
from resnetc.data.transformer import DataTransformer
from resnetc.data.mean import write_mean
from resnetc.errors import ResnetcError
from resnetc.proto import caffe_pb2


def caffe_transform_loop(img, phase, raw_stream, *, crop=0, mirror=False, mean=None, mean_values=None, scale=1.0):
    """A transliteration of Caffe's loop (index arithmetic included), float32 throughout."""
    c_, h_, w_ = img.shape
    flat = img.ravel()
    do_mirror = mirror and (next(raw_stream) % 2)
    height, width = h_, w_
    h_off = w_off = 0
    if crop:
        height = width = crop
        if phase == "TRAIN":
            h_off = next(raw_stream) % (h_ - crop + 1)
            w_off = next(raw_stream) % (w_ - crop + 1)
        else:
            h_off = (h_ - crop) // 2
            w_off = (w_ - crop) // 2
    out = np.zeros(c_ * height * width, dtype=np.float32)
    mflat = mean.ravel() if mean is not None else None
    mv = None
    if mean_values is not None:
        mv = list(mean_values) * c_ if len(mean_values) == 1 else list(mean_values)
    sc = np.float32(scale)
    for c in range(c_):
        for h in range(height):
            for w in range(width):
                top_index = (c * height + h) * width + (width - 1 - w if do_mirror else w)
                data_index = (c * h_ + h_off + h) * w_ + w_off + w
                x = np.float32(flat[data_index])
                if mflat is not None:
                    out[top_index] = (x - np.float32(mflat[data_index])) * sc
                elif mv is not None:
                    out[top_index] = (x - np.float32(mv[c])) * sc
                else:
                    out[top_index] = x * sc
    return out.reshape(c_, height, width)


def _mt_stream(seed):
    rs = np.random.RandomState(seed)
    while True:
        yield int(rs.randint(0, 2 ** 32, dtype=np.uint32))


def _param(**kw):
    tp = caffe_pb2.TransformationParameter()
    for k, v in kw.items():
        if k == "mean_value":
            tp.mean_value.extend(v)
        else:
            setattr(tp, k, v)
    return tp


CASES = [
    dict(phase="TRAIN", crop=5, mirror=True, scale=0.5),
    dict(phase="TEST", crop=5, mirror=True),  # TEST mirrors randomly too
    dict(phase="TEST", crop=4),  # centre crop, (H-crop)//2 with odd remainders
    dict(phase="TRAIN", crop=0, mirror=True, mean_values=[10.0]),
    dict(phase="TRAIN", crop=6, mean_values=[10.0, 20.0, 30.0], scale=0.00390625),
    dict(phase="TRAIN", crop=5, mirror=True, mean="file", scale=0.017),
    dict(phase="TEST", crop=5, mean="file"),
    dict(phase="TRAIN", crop=7, mirror=True),  # crop == H: Rand(1) still consumes a draw
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "mean_values"))
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_matches_caffe_loop(case, dtype, tmp_path):
    rs = np.random.RandomState(3)
    shape = (3, 7, 9)
    if dtype == "uint8":
        imgs = rs.randint(0, 256, size=(6,) + shape).astype(np.uint8)
    else:
        imgs = rs.uniform(-3, 3, size=(6,) + shape).astype(np.float32)
    mean = None
    kw = dict(crop_size=case.get("crop", 0), mirror=case.get("mirror", False), scale=case.get("scale", 1.0))
    if case.get("mean") == "file":
        mean = rs.uniform(0, 255, size=shape).astype(np.float32)
        write_mean(str(tmp_path / "mean.binaryproto"), mean)
        kw["mean_file"] = str(tmp_path / "mean.binaryproto")
    if case.get("mean_values"):
        kw["mean_value"] = case["mean_values"]
    t = DataTransformer(_param(**kw), case["phase"], rng=CaffeRNG(1701))
    ref_stream = _mt_stream(1701)
    for img in imgs:
        got = t.transform(img, t.draw(), source="s", key=b"k")
        want = caffe_transform_loop(img, case["phase"], ref_stream, crop=case.get("crop", 0),
                                    mirror=case.get("mirror", False), mean=mean,
                                    mean_values=case.get("mean_values"), scale=case.get("scale", 1.0))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_rng_is_boost_mt19937():
    # mt19937's 10000th output for the default seed 5489 is 4123659995 (C++11 [rand.predef])
    assert CaffeRNG(5489).raws(10000)[-1] == 4123659995
    r = CaffeRNG(7)
    perm = list(range(20))
    r.shuffle(perm)
    assert sorted(perm) == list(range(20)) and perm != list(range(20))


def test_draws_only_when_random():
    assert not DataTransformer(_param(crop_size=3), "TEST").needs_rand  # centre crop: no RNG (no InitRand)
    assert DataTransformer(_param(crop_size=3), "TRAIN").draws_per_image == 2
    assert DataTransformer(_param(crop_size=3, mirror=True), "TEST").draws_per_image == 1
    assert DataTransformer(_param(crop_size=3, mirror=True), "TRAIN").draws_per_image == 3


def test_augment_extension_off_by_default_and_train_only():
    img = np.arange(2 * 6 * 6, dtype=np.uint8).reshape(2, 6, 6)
    tp = _param()
    assert not tp.HasField("resnetc_augment")
    tp.resnetc_augment.pad = 2
    tp.resnetc_augment.random_flip = True
    test = DataTransformer(tp, "TEST")
    assert test.draws_per_image == 0
    np.testing.assert_array_equal(test.transform(img, test.draw()), img.astype(np.float32))
    train = DataTransformer(tp, "TRAIN", rng=CaffeRNG(5))
    seen = set()
    for _ in range(40):
        d = train.draw()
        out = train.transform(img, d)
        y, x, flip = int(d[0]) % 5, int(d[1]) % 5, int(d[2]) % 2
        padded = np.zeros((2, 10, 10), np.float32)
        padded[:, 2:8, 2:8] = img
        want = padded[:, y:y + 6, x:x + 6]
        if flip:
            want = want[:, :, ::-1]
        np.testing.assert_array_equal(out, want)
        seen.add((y, x, flip))
    assert len(seen) > 10


def test_mean_file_of_wrong_shape(tmp_path):
    write_mean(str(tmp_path / "m.binaryproto"), np.zeros((3, 5, 5), np.float32))
    t = DataTransformer(_param(mean_file=str(tmp_path / "m.binaryproto")), "TEST")
    with pytest.raises(ResnetcError) as e:
        t.transform(np.zeros((3, 7, 9), np.uint8), t.draw(), source="train_lmdb", key=b"00000003")
    msg = str(e.value)
    assert "m.binaryproto" in msg and "00000003" in msg and "train_lmdb" in msg and "3x5x5" in msg


def test_bad_parameters(tmp_path):
    with pytest.raises(ResnetcError, match="force_color and force_gray"):
        DataTransformer(_param(force_color=True, force_gray=True), "TEST")
    write_mean(str(tmp_path / "m.binaryproto"), np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ResnetcError, match="mean_file and mean_value"):
        DataTransformer(_param(mean_file=str(tmp_path / "m.binaryproto"), mean_value=[1.0]), "TEST")
    t = DataTransformer(_param(mean_value=[1.0, 2.0]), "TEST")
    with pytest.raises(ResnetcError, match="2 mean_value entries for a 3-channel"):
        t.transform(np.zeros((3, 4, 4), np.uint8), t.draw(), source="s", key=b"k")
    t = DataTransformer(_param(crop_size=5), "TEST")
    with pytest.raises(ResnetcError, match="smaller than crop_size 5"):
        t.transform(np.zeros((1, 4, 8), np.uint8), t.draw(), source="s", key=b"k")
