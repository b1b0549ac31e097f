"""Caffe's solvers for CaffeNets: ``Solver`` (training loop, testing, snapshots, resume), the update rules
(``rules``), the lr policies (``lr_policy``) and ``resnetc test``'s evaluation loop (``testing``)."""
from .core import Solver
from .lr_policy import POLICIES, learning_rate
from .rules import RULES

__all__ = ["Solver", "POLICIES", "RULES", "learning_rate"]
