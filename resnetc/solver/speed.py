"""Speed options of the Solver (``SolverParameter.resnetc``: ``amp``, ``channels_last``, ``compile``; the
CLI's ``--amp``, ``--channels-last``, ``--compile`` write the same fields).

None of them changes Caffe's arithmetic of the update (clip → ÷ iter_size → decay → rule, in float32 on
float32 weights); they change how the forward/backward is computed:

* ``amp: "bf16"|"fp16"`` runs the train net's forward under ``torch.autocast`` (weights stay float32, so
  gradients arrive in float32). fp16 adds dynamic loss scaling with ``torch.amp.GradScaler``: the loss is
  multiplied by the scale before ``backward``, the gradients are unscaled *before* Caffe's clip/decay/update
  and an update whose gradients hold inf/NaN is skipped (the iteration still counts; the scale halves).
* ``channels_last``: the net's 4-D weights and the 4-D inputs use the NHWC memory format.
* ``compile``: the train forward runs through ``torch.compile`` (the first iterations compile).

Test nets always run float32 eager: only the train forward is affected.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional

import torch

from ..errors import ResnetcError

log = logging.getLogger("resnetc.solver")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _UpdateStep(torch.optim.Optimizer):
    """Lets ``GradScaler`` drive the Solver's own update: ``step()`` runs ``self.update`` (Caffe's
    ApplyUpdate) and is only called by the scaler when the gradients are finite."""

    def __init__(self, params):
        super().__init__(params, {})
        self.update: Optional[Callable[[], None]] = None

    def step(self, closure=None):  # noqa: D102 - see the class docstring
        self.update()
        return True


class SpeedOptions:
    """The speed options of one Solver: wraps the train forward, the backward and the update."""

    def __init__(self, amp: str = "", channels_last: bool = False, compile: bool = False, device=None,
                 file: Optional[str] = None):
        amp = (amp or "").strip().lower()
        if amp not in ("", "bf16", "fp16"):
            raise ResnetcError(f"amp must be \"bf16\" or \"fp16\" (or empty for float32), got \"{amp}\"", file=file)
        self.amp = amp
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = AMP_DTYPES.get(amp)
        self.scaler = None
        self._step = None
        if amp == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        if self.enabled:
            log.info("Speed options: amp=%s channels_last=%s compile=%s", amp or "off", self.channels_last,
                     self.compile)

    @classmethod
    def from_solver(cls, param, device=None, file: Optional[str] = None) -> "SpeedOptions":
        r = param.resnetc
        return cls(r.amp, r.channels_last, r.compile, device=device, file=file)

    @property
    def enabled(self) -> bool:
        return bool(self.amp or self.channels_last or self.compile)

    # -- nets and forward ---------------------------------------------------------------------------------
    def prepare_net(self, net) -> None:
        """In place: NHWC weights for channels_last (4-D params only; others are unaffected)."""
        if self.channels_last:
            net.to(memory_format=torch.channels_last)

    def forward_fn(self, module) -> Callable:
        """The callable running the train forward of ``module`` (the net, or its DDP wrapper)."""
        return torch.compile(module) if self.compile else module

    def inputs(self, batch: dict) -> dict:
        if not self.channels_last:
            return batch
        return {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in batch.items()}

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- backward and update ------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def update(self, apply_update: Callable[[], None], active: list) -> bool:
        """Run ``apply_update`` (Caffe's ApplyUpdate); with fp16 loss scaling, unscale the gradients of the
        ``active`` params (the Solver's ``(index, param, lr_mult, decay)`` list) first and skip the update when
        they hold inf/NaN. Returns whether the update ran."""
        if self.scaler is None or not active:
            apply_update()
            return True
        if self._step is None:
            self._step = _UpdateStep([prm for _, prm, _, _ in active])
        self._step.update = apply_update
        scale = self.scaler.get_scale()
        ran = self.scaler.step(self._step) is not None
        self.scaler.update()
        if not ran:
            log.warning("fp16 gradients overflowed at loss scale %g: update skipped, loss scale now %g", scale,
                        self.scaler.get_scale())
        return ran
