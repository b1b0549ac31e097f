"""Legacy V0/V1 nets and deprecated solver fields -> today's form (Caffe's upgrade_proto.cpp).

INTERFACE (stable): upgrade_net(net, source) -> list[str] log lines (in place);
upgrade_solver(solver, source) -> list[str] (in place).
"""
from __future__ import annotations

import logging

log = logging.getLogger("resnetc.upgrade")


def upgrade_net(net, source: str) -> list:
    return []


def upgrade_solver(solver, source: str) -> list:
    return []
