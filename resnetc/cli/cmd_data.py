"""Dataset tools: ``convert-imageset``, ``compute-image-mean`` (Caffe's tools, same flags) and
``data cifar10|mnist|digits`` (ready-made train/test LMDBs + mean file)."""
from __future__ import annotations

import logging

import click

log = logging.getLogger("resnetc.data")


@click.command("convert-imageset")
@click.argument("root")
@click.argument("list_file", metavar="LIST")
@click.argument("db", metavar="DB")
@click.option("--resize_height", "--resize-height", "resize_height", type=int, default=0, show_default=True,
              help="Resize to this height (only if --resize_width is > 0 too).")
@click.option("--resize_width", "--resize-width", "resize_width", type=int, default=0, show_default=True,
              help="Resize to this width (only if --resize_height is > 0 too).")
@click.option("--shuffle", is_flag=True, help="Shuffle the list (Caffe's shuffle; --seed makes it repeatable).")
@click.option("--gray", is_flag=True, help="Read the images as grey (1 channel).")
@click.option("--encoded", is_flag=True, help="Store encoded images (the file's bytes when possible).")
@click.option("--encode_type", "--encode-type", "encode_type", default="",
              help="Encoding of stored images ('png', 'jpg', ...); implies --encoded.")
@click.option("--backend", type=click.Choice(["lmdb"]), default="lmdb", show_default=True)
@click.option("--check_size", "--check-size", "check_size", is_flag=True, help="Require all images to have the same size.")
@click.option("--skip-bad", is_flag=True, help="Skip (and count) unreadable images instead of stopping, as Caffe does.")
@click.option("--seed", type=int, default=None, help="Seed of --shuffle (default: random, like Caffe).")
def convert_imageset_cmd(root, list_file, db, resize_height, resize_width, shuffle, gray, encoded, encode_type, backend,
                         check_size, skip_bad, seed):
    """Convert the images listed in LIST (lines 'path label', paths relative to ROOT) to a Datum LMDB at DB.

    Like Caffe's convert_imageset, ROOT is prepended as text: give it a trailing '/'. The DB is written to a
    temporary directory and renamed into place at the end.
    """
    from ..data.imageset import convert_imageset

    res = convert_imageset(root, list_file, db, resize_height=resize_height, resize_width=resize_width,
                           shuffle=shuffle, gray=gray, encoded=encoded, encode_type=encode_type, backend=backend,
                           check_size=check_size, skip_bad=skip_bad, seed=seed)
    click.echo(f"{db}: {res['written']} images" + (f" ({res['skipped']} skipped)" if res["skipped"] else ""))


@click.command("compute-image-mean")
@click.argument("db", metavar="DB")
@click.argument("out", metavar="[OUT.binaryproto]", required=False)
@click.option("--backend", type=click.Choice(["lmdb", "leveldb"]), default="lmdb", show_default=True)
def compute_image_mean_cmd(db, out, backend):
    """Mean image of the Datum records of DB, written as a binary BlobProto (Caffe's compute_image_mean)."""
    from ..data.mean import compute_image_mean, write_mean

    mean = compute_image_mean(db, backend)
    if out:
        write_mean(out, mean)
    for c in range(mean.shape[0]):
        log.info("mean_value channel [%d]: %s", c, float(mean[c].astype("float64").mean()))


@click.group("data")
def data_group():
    """Ready-made data sets: train/test LMDBs + mean.binaryproto."""


@data_group.command("cifar10")
@click.argument("src")
@click.argument("out_dir", metavar="DIR")
def cifar10_cmd(src, out_dir):
    """CIFAR-10 binary archive (cifar-10-binary.tar.gz, or its extracted folder) -> DIR/cifar10_{train,test}_lmdb."""
    from ..data.cifar import convert_cifar10

    counts = convert_cifar10(src, out_dir)
    click.echo(f"{out_dir}: cifar10_train_lmdb {counts['train']}, cifar10_test_lmdb {counts['test']}, mean.binaryproto")


@data_group.command("mnist")
@click.argument("src")
@click.argument("out_dir", metavar="DIR")
def mnist_cmd(src, out_dir):
    """MNIST IDX files in SRC (train-/t10k- images and labels, .gz or not) -> DIR/mnist_{train,test}_lmdb."""
    from ..data.mnist import convert_mnist

    counts = convert_mnist(src, out_dir)
    click.echo(f"{out_dir}: mnist_train_lmdb {counts['train']}, mnist_test_lmdb {counts['test']}, mean.binaryproto")


@data_group.command("digits")
@click.argument("out_dir", metavar="DIR")
@click.option("--classes", default="", help="Keep only these digits, e.g. 0-4 or 1,3,5-7 (default: all).")
@click.option("--relabel", is_flag=True, help="Number the kept digits 0..k-1 (default: keep the digit as label); "
              "DIR/labels.txt names the digit of each label.")
@click.option("--size", type=int, default=8, show_default=True, help="Resize the 8x8 images (bilinear) to SIZExSIZE.")
def digits_cmd(out_dir, classes, relabel, size):
    """The UCI handwritten digits shipped with resnetc (1,797 8x8 images, CC BY 4.0) -> DIR/digits_{train,test}_lmdb
    (1,437 / 360 images: every 5th image is test) + DIR/mean.binaryproto + DIR/labels.txt (line i: the digit of
    label i).

    \b
    Two class splits for fine-tuning (pretrain on 0-4, fine-tune on 5-9, both labelled 0..4):
      resnetc data digits --classes 0-4 --relabel --size 16 d04
      resnetc data digits --classes 5-9 --relabel --size 16 d59"""
    from ..data.digits import write_digits

    counts = write_digits(out_dir, classes or None, relabel, size)
    click.echo(f"{out_dir}: digits_train_lmdb {counts['train']}, digits_test_lmdb {counts['test']}, mean.binaryproto, "
               f"labels.txt")


COMMANDS = [convert_imageset_cmd, compute_image_mean_cmd, data_group]
