"""Early stopping (not in Caffe; ``SolverParameter.resnetc``: ``early_stop_output``, ``early_stop_patience``,
``early_stop_mode``; the CLI's ``--early-stop OUTPUT:PATIENCE[:min|max]`` writes the same fields).

After every test pass of test net 0 the output blob ``early_stop_output`` (a scalar such as ``accuracy`` or
``loss``) is compared with the best value so far: ``max`` mode counts a strictly larger value as an
improvement, ``min`` mode a strictly smaller one (NaN never improves). When ``early_stop_patience``
consecutive test passes bring no improvement the Solver stops at that test, before the iteration's forward,
the way Caffe stops on SIGINT: it snapshots as ``snapshot_after_train`` would and logs
"Optimization stopped early.". The counters start afresh in each process (a resumed run does not know the
tests of the run it resumes: Caffe's solver state has no place for them).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..errors import ResnetcError
from .numfmt import g

MODES = ("max", "min")


class EarlyStopping:
    """The patience counter over one test output."""

    def __init__(self, output: str, patience: int, mode: str = "max", file: Optional[str] = None):
        self.output = output
        self.patience = int(patience)
        self.mode = mode
        self.file = file
        self.best = None  # best value so far (float)
        self.best_iter = None
        self.bad = 0  # consecutive test passes without improvement

    @classmethod
    def from_solver(cls, param, file: Optional[str] = None, output_names=None) -> Optional["EarlyStopping"]:
        """The rule of a SolverParameter, or None when early stopping is off. Checks the settings before any
        training; ``output_names`` (test net 0's outputs, when this process has the test net) lets a wrong
        output name fail here too."""
        r = param.resnetc
        if not r.early_stop_output:
            if r.HasField("early_stop_patience") or r.HasField("early_stop_mode"):
                raise ResnetcError("early_stop_patience/early_stop_mode are set but early_stop_output is not: name "
                                   "the test output to watch (e.g. early_stop_output: \"accuracy\")", file=file)
            return None
        name = r.early_stop_output
        if r.early_stop_patience <= 0:
            raise ResnetcError(f"early_stop_patience must be > 0 (got {r.early_stop_patience}) to stop on "
                               f"'{name}'", file=file)
        mode = r.early_stop_mode.strip().lower()
        if mode not in MODES:
            raise ResnetcError(f"early_stop_mode must be \"max\" or \"min\", got \"{r.early_stop_mode}\"", file=file)
        if not len(param.test_iter) or param.test_interval <= 0:
            raise ResnetcError(f"early stopping on '{name}' needs a test net: set test_iter and test_interval",
                               file=file)
        rule = cls(name, r.early_stop_patience, mode, file)
        if output_names is not None:
            rule.check_name(output_names)
        return rule

    def check_name(self, names) -> None:
        names = list(dict.fromkeys(names))
        if self.output not in names:
            raise ResnetcError(f"early stopping: '{self.output}' is not an output of test net #0 (its outputs: "
                               f"{', '.join(names) or 'none'})", file=self.file)

    def improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def update(self, results: list, it: int, log=None) -> bool:
        """Take one test pass of test net 0 (``[(name, mean)]`` per output element) at iteration ``it``;
        True when training should stop now."""
        values = [v for name, v in results if name == self.output]
        if not values:
            self.check_name([name for name, _ in results])
        if len(values) != 1:
            raise ResnetcError(f"early stopping: test output '{self.output}' has {len(values)} values; it needs a "
                               f"single number (a scalar blob such as accuracy or loss)", file=self.file)
        value = float(np.float32(values[0]))
        if self.improved(value):
            self.best, self.best_iter, self.bad = value, it, 0
            return False
        self.bad += 1
        if self.bad < self.patience:
            if log is not None:
                log.info("Early stopping: %s has not improved for %d of %d tests (best %s at iteration %d)",
                         self.output, self.bad, self.patience, g(np.float32(self.best)) if self.best is not None
                         else "nan", self.best_iter if self.best_iter is not None else it)
            return False
        if log is not None:
            log.info("Early stopping at iteration %d: %s has not improved for %d tests (best %s at iteration %s)",
                     it, self.output, self.bad, g(np.float32(self.best)) if self.best is not None else "nan",
                     self.best_iter if self.best_iter is not None else "none")
        return True
