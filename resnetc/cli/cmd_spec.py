"""`resnetc spec`: write generated nets (train_val + deploy + solver).

``resnetc spec resnet --depth 50 -o specs/resnet50.prototxt`` writes ``specs/resnet50.prototxt`` (train_val),
``specs/resnet50_deploy.prototxt`` and ``specs/resnet50_solver.prototxt``; ``resnetc spec resnet-all specs``
rewrites every committed spec.
"""
from __future__ import annotations

import logging

import click

from ..errors import ResnetcError

log = logging.getLogger("resnetc.spec")


def parse_data(value: str | None):
    """``lmdb:TRAIN[,TEST]`` -> DataSource (TEST defaults to TRAIN, with a warning)."""
    from ..models.resnet import DataSource

    if value is None:
        return None
    kind, sep, rest = value.partition(":")
    if not sep or kind != "lmdb" or not rest:
        raise ResnetcError(f"--data wants lmdb:TRAIN_PATH[,TEST_PATH], got '{value}'")
    train, _, test = rest.partition(",")
    if not test:
        log.warning("--data gives one LMDB: the TEST phase reads the training set %s", train)
    return DataSource(train=train, test=test or train)


def parse_input(value: str | None):
    """``N,C,H,W`` -> DataSource fed by Input blobs ``data`` (N,C,H,W) and ``label`` (N)."""
    from ..models.resnet import DataSource

    if value is None:
        return None
    try:
        dims = tuple(int(d) for d in value.replace("x", ",").split(","))
    except ValueError:
        raise ResnetcError(f"--input wants N,C,H,W integers, got '{value}'") from None
    if len(dims) != 4 or min(dims) < 1:
        raise ResnetcError(f"--input wants four positive sizes N,C,H,W, got '{value}'")
    return DataSource(shape=dims)


@click.group("spec")
def spec() -> None:
    """Generate nets: train_val, deploy and a solver."""


@spec.command("resnet")
@click.option("--depth", type=int, required=True,
              help="ImageNet: 18, 34, 50, 101, 152. With --cifar: 6n+2 (20, 32, 44, 56, 110).")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Classifier outputs (default 1000, or 10 with --cifar); names the classifier fc<N>.")
@click.option("--cifar", is_flag=True, help="CIFAR ResNet (3 stages of 16/32/64, option-B shortcuts).")
@click.option("--data", "data", metavar="lmdb:TRAIN[,TEST]", default=None, help="Train_val reads these LMDBs.")
@click.option("--input", "input_shape", metavar="N,C,H,W", default=None,
              help="Train_val takes Input blobs data (N,C,H,W) and label (N) instead of LMDBs.")
@click.option("--conv1-bias/--no-conv1-bias", default=None,
              help="conv1 with a bias (default: as released, i.e. only ResNet-50).")
@click.option("-o", "--output", "output", required=True, metavar="FILE",
              help="Train_val path; deploy and solver go to FILE's stem + _deploy / _solver.")
def resnet_cmd(depth, num_classes, cifar, data, input_shape, conv1_bias, output) -> None:
    """Write a ResNet train_val, deploy and solver.

    \b
    FILE = dir/name.prototxt gives
      dir/name.prototxt          train_val (Data layers, or Input with --input)
      dir/name_deploy.prototxt   deploy (Input "data" -> Softmax "prob")
      dir/name_solver.prototxt   the papers' solver; net: FILE, snapshot_prefix: dir/name
    Without --data or --input the train_val reads Caffe's example LMDBs
    (examples/imagenet/ilsvrc12_{train,val}_lmdb, examples/cifar10/cifar10_{train,test}_lmdb).
    """
    from ..models.files import resnet_spec_texts, write_texts

    if data is not None and input_shape is not None:
        raise ResnetcError("give --data or --input, not both")
    if cifar and conv1_bias is not None:
        raise ResnetcError("--conv1-bias applies to ImageNet ResNets only")
    source = parse_data(data) or parse_input(input_shape)
    texts = resnet_spec_texts(output, depth, cifar=cifar, num_classes=num_classes, data=source,
                              conv1_bias=conv1_bias)
    write_texts(texts)
    for path in texts:
        click.echo(path)


@spec.command("resnet-all")
@click.argument("directory", default="specs")
def resnet_all_cmd(directory) -> None:
    """Rewrite every committed ResNet spec in DIRECTORY (default specs; run in the repository root)."""
    from ..models.files import committed_texts, write_texts

    texts = committed_texts(directory)
    write_texts(texts)
    log.info("wrote %d files to %s", len(texts), directory)


COMMANDS = [spec]
