"""``convert-imageset``: an image list -> an LMDB of Datum records (Caffe's ``tools/convert_imageset``).

Key = 8-digit zero-padded line index (after the optional shuffle) + ``_`` + path, e.g. ``00000042_cat/1.jpg``.
Raw datums hold CHW BGR (or grey) uint8 pixels + label. Encoded datums hold the original file bytes when
there is no resize and the file's extension matches the requested encoding (``jpeg`` counts as ``jpg``),
else the image re-encoded with OpenCV. With ``--encoded`` and no ``--encode_type`` the encoding is guessed
from each file's extension. A bad image stops the conversion with one error naming the list file, line and
image, unless ``skip_bad`` (then it is skipped, its index unused, and counted in the log, as Caffe does).
"""
from __future__ import annotations

import logging

from ..errors import ResnetcError
from . import sources
from .datum import array_to_datum, encode_image, encoded_datum, hwc_to_chw
from .db import write_db
from .rng import CaffeRNG

log = logging.getLogger(__name__)


def _match_ext(filename: str, encoding: str) -> bool:
    p = filename.rfind(".")
    ext = (filename[p + 1:] if p >= 0 else filename).lower()
    enc = encoding.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")


def convert_imageset(root: str, list_file: str, db_path: str, *, resize_height: int = 0, resize_width: int = 0,
                     shuffle: bool = False, gray: bool = False, encoded: bool = False, encode_type: str = "",
                     backend: str = "lmdb", check_size: bool = False, skip_bad: bool = False,
                     seed: int | None = None) -> dict:
    """Write ``db_path`` (atomically). Returns {"written": n, "skipped": n}."""
    lines = sources.read_list(list_file)
    if shuffle:
        log.info("Shuffling data")
        CaffeRNG(seed).shuffle(lines)
    log.info("A total of %d images.", len(lines))
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
        encoded = True
    is_color = not gray
    resize = resize_height > 0 and resize_width > 0
    written = skipped = 0
    size = None
    with write_db(db_path, backend) as db:
        for line_id, (path, label, lineno) in enumerate(lines):
            filename = root + path
            enc = encode_type
            if encoded and not enc:
                p = path.rfind(".")
                if p < 0:
                    log.warning("Failed to guess the encoding of '%s'", path)
                enc = path[p + 1:].lower()
            try:
                img = sources.read_image(filename, is_color=is_color, new_height=resize_height if resize else 0,
                                         new_width=resize_width if resize else 0, source=list_file, line=lineno)
                if encoded:
                    if not resize and _match_ext(filename, enc):
                        with open(filename, "rb") as f:
                            datum = encoded_datum(f.read(), label)
                    else:
                        datum = encoded_datum(encode_image(img, enc), label)
                else:
                    datum = array_to_datum(hwc_to_chw(img), label)
            except ResnetcError:
                if not skip_bad:
                    raise
                log.error("Skipping %s (line %d of %s): could not read the image", filename, lineno, list_file)
                skipped += 1
                continue
            if check_size and not encoded:
                shp = (datum.channels, datum.height, datum.width)
                if size is None:
                    size = shp
                elif shp != size:
                    raise ResnetcError(f"image '{filename}' is {'x'.join(map(str, shp))}, not "
                                       f"{'x'.join(map(str, size))} like the first one (--check_size)",
                                       file=list_file, line=lineno)
            db.put(f"{line_id:08d}_{path}", datum.SerializeToString())
            written += 1
            if written % 1000 == 0:
                log.info("Processed %d files.", written)
        if written == 0:  # raising here leaves nothing behind
            raise ResnetcError(f"no image could be converted ({skipped} skipped)", file=list_file)
    if written % 1000 != 0:
        log.info("Processed %d files.", written)
    if skipped:
        log.warning("Skipped %d unreadable image(s).", skipped)
    return {"written": written, "skipped": skipped}
