"""Spec generators built with :mod:`resnetc.netspec` (ResNets: :mod:`.resnet`; solvers: :mod:`.solvers`;
the three files of a generated net and the committed ``specs/``: :mod:`.files`)."""
from .files import committed_texts, resnet_spec_texts, spec_paths
from .resnet import DataSource, cifar_resnet, imagenet_resnet, resnet
from .solvers import cifar_solver, imagenet_solver

__all__ = ["resnet", "imagenet_resnet", "cifar_resnet", "DataSource", "imagenet_solver", "cifar_solver",
           "resnet_spec_texts", "committed_texts", "spec_paths"]
