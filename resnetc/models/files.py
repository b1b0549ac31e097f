"""The three files of a generated ResNet: train_val, deploy and solver, named from one path.

``FILE`` given as ``dir/name.prototxt`` (any extension, or none) gives::

    dir/name.prototxt           train_val (TRAIN and TEST phases)
    dir/name_deploy.prototxt    deploy (Input -> prob)
    dir/name_solver.prototxt    solver, whose ``net:`` is FILE exactly as given and whose
                                ``snapshot_prefix`` is ``dir/name`` (Caffe resolves both against the
                                directory ``train`` runs in, so give FILE relative to it)

The committed ``specs/`` are these files for every net of :data:`COMMITTED`; regenerate them with
``.venv/bin/resnetc spec resnet-all specs`` (run in the repository root); ``tests/test_models.py`` fails when
they differ from what the generators produce now.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from ..atomic import write_text
from ..errors import ResnetcError
from ..prototxt import to_text
from . import resnet as _resnet
from . import solvers as _solvers

__all__ = ["SpecPaths", "spec_paths", "resnet_spec_texts", "write_texts", "COMMITTED", "committed_texts"]

# (depth, cifar) of the committed specs, with their file stems in specs/
COMMITTED = [(d, False) for d in (18, 34, 50, 101, 152)] + [(d, True) for d in _resnet.CIFAR_DEPTHS]


@dataclasses.dataclass(frozen=True)
class SpecPaths:
    train_val: str
    deploy: str
    solver: str
    snapshot_prefix: str


def spec_paths(file: str) -> SpecPaths:
    stem, ext = os.path.splitext(file)
    ext = ext or ".prototxt"
    return SpecPaths(train_val=file, deploy=f"{stem}_deploy{ext}", solver=f"{stem}_solver{ext}",
                     snapshot_prefix=stem)


def resnet_spec_texts(file: str, depth: int, *, cifar: bool = False, num_classes: Optional[int] = None,
                      data: Optional[_resnet.DataSource] = None, conv1_bias: Optional[bool] = None) -> dict:
    """{path: text} of the train_val, deploy and solver of one ResNet (nothing written)."""
    paths = spec_paths(file)
    kw = dict(data=data)
    if num_classes is not None:
        kw["num_classes"] = num_classes
    if not cifar:
        kw["conv1_bias"] = conv1_bias
    train_val = _resnet.resnet(depth, cifar=cifar, phase="train_val", **kw)
    deploy = _resnet.resnet(depth, cifar=cifar, phase="deploy", **kw)
    make_solver = _solvers.cifar_solver if cifar else _solvers.imagenet_solver
    with_test = not (data is not None and data.is_input)
    batch = {} if with_test else {"batch": data.shape[0]}
    solver = make_solver(paths.train_val, paths.snapshot_prefix, with_test=with_test, **batch)
    what = deploy.name
    return {paths.train_val: _header(f"{what} train_val") + to_text(train_val),
            paths.deploy: _header(f"{what} deploy") + to_text(deploy),
            paths.solver: _header(f"{what} solver") + to_text(solver)}


def _header(what: str) -> str:
    return f"# {what}, written by `resnetc spec resnet` (resnetc/models). Regenerate rather than edit.\n"



def committed_name(depth: int, cifar: bool) -> str:
    return f"resnet{depth}.prototxt"


def committed_texts(directory: str = "specs") -> dict:
    """{path: text} of every committed spec, with paths under ``directory`` (as written in the solvers)."""
    out = {}
    for depth, cifar in COMMITTED:
        out.update(resnet_spec_texts(os.path.join(directory, committed_name(depth, cifar)), depth, cifar=cifar))
    return out


def write_texts(texts: dict) -> None:
    """Write each file atomically (a file is either the old one or the complete new one)."""
    for path, text in texts.items():
        parent = os.path.dirname(path)
        if parent and not os.path.isdir(parent):
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise ResnetcError(f"cannot create directory {parent}: {e.strerror}", file=path) from None
        write_text(path, text)
