"""The Solver: Caffe's ``Solver``/``SGDSolver`` training loop over a CaffeNet (CAFFE_SEMANTICS.md §4).

Per iteration, in Caffe's order: zero the param diffs; test if due; ``iter_size`` forward/backward passes
(param gradients accumulate); smoothed loss; display lines; the update (lr policy → clip by global L2 norm
→ ÷ iter_size → L2/L1 decay × decay_mult → the type's rule with rate × lr_mult → ``w -= step``);
``iter += 1``; snapshot if due. ``solve()`` adds the final snapshot, the extra forward after the last update
and the final test. Params with ``lr_mult: 0`` and BatchNorm statistics are never touched (their Caffe
update is exactly zero), so frozen weights stay bit-identical. Early stopping (``resnetc.early_stop_*``, not
in Caffe; ``early_stop.py``) ends the loop at a test pass the way Caffe's SIGINT stop does: the snapshot of
``snapshot_after_train``, "Optimization stopped early.", no extra forward and no final test.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import ResnetcError
from ..graph import build_graph
from ..proto import caffe_pb2
from ..prototxt import NetSource, read_net, read_solver, to_text
from . import state as _state
from .early_stop import EarlyStopping
from .feeds import pipeline_feed
from .lr_policy import check_policy, learning_rate
from .numfmt import g
from .progress import ProgressBar
from .rules import LEGACY_TYPES, rule_class
from .speed import SpeedOptions
from .testing import output_loss_weights, test_pass

log = logging.getLogger("resnetc.solver")
f32 = np.float32

FeedFactory = Callable  # (graph, phase, test_index or None, seed, device) -> callable returning {top: tensor}


def default_snapshot_prefix(param, solver_file: Optional[str]) -> None:
    """Caffe's rule when a solver file is read for training: no prefix → the solver path without its
    extension; a prefix naming an existing directory → ``<dir>/<solver file stem>``."""
    if not solver_file:
        return
    stem = os.path.splitext(solver_file)[0]
    if not param.HasField("snapshot_prefix"):
        param.snapshot_prefix = stem
    elif os.path.isdir(param.snapshot_prefix):
        param.snapshot_prefix = os.path.join(param.snapshot_prefix, os.path.basename(stem))
        log.info("snapshot_prefix is a directory: snapshots go to %s_iter_N", param.snapshot_prefix)


class Solver:
    """Train a Caffe net with Caffe's solver semantics.

    ``solver``: a solver prototxt path or a ``SolverParameter``. ``net``: a net prototxt overriding the
    solver's ``net``/``train_net`` (the CLI's ``resnetc train NET SOLVER``). ``weights``: .caffemodel paths
    loaded into the train net and every test net (replaces the solver's ``weights``). ``feed_factory``
    builds the batch source of each net (default: the data pipelines of its data layers).
    """

    is_root = True  # False on the non-zero ranks of a distributed run (no progress bar there)

    def __init__(self, solver, *, net=None, weights=None, device=None, level: Optional[int] = None,
                 stages=None, feed_factory: Optional[FeedFactory] = None, solver_file: Optional[str] = None):
        if isinstance(solver, caffe_pb2.SolverParameter):
            param = caffe_pb2.SolverParameter()
            param.CopyFrom(solver)
        else:
            solver_file = os.fspath(solver)
            param = read_solver(solver_file)
            default_snapshot_prefix(param, solver_file)
        self.file = solver_file
        self.param = param
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._feed_factory = feed_factory or self._default_feed
        if net is not None:
            for f in ("net_param", "train_net", "train_net_param"):
                param.ClearField(f)
            param.net = os.fspath(net)
        if level is not None:
            param.train_state.level = level
        if stages:
            param.train_state.stage.extend(stages)
        if weights is not None:
            param.ClearField("weights")
            param.weights.extend(weights if isinstance(weights, (list, tuple)) else [weights])
        self._check()
        # speed options (amp / channels_last / compile; resnetc.solver.speed): hooks in _make_net,
        # _forward_backward and step
        self.speed = SpeedOptions.from_solver(param, self.device, solver_file)
        log.info("Initializing solver from parameters: \n%s", to_text(param))
        self._probe_snapshot_prefix()
        self.seed = param.random_seed if param.random_seed >= 0 else None
        if self.seed is not None:
            torch.manual_seed(self.seed)
            np.random.seed(self.seed & 0xFFFFFFFF)
        test_sources = self._test_sources()
        self.net, self.train_feed = self._build_train_net()
        self.test_nets, self.test_feeds, self.test_iters = self._build_test_nets(test_sources)
        for w in [s.strip() for entry in param.weights for s in entry.split(",") if s.strip()]:
            self.load_weights(w)
        self.iter = 0
        self.current_step = 0
        self._learnable = self.net.learnable_params()
        self.rule = rule_class(param.type, self.file)(param, [p for _, _, p, _, _ in self._learnable])
        self._active = self._active_params()
        self._train_weights = output_loss_weights(self.net.graph)
        self._test_weights = [output_loss_weights(n.graph) for n in self.test_nets]
        self._losses: list = []
        self._smoothed = f32(0)
        self._last_outputs = None
        self._last_finite = None  # (iter, loss)
        self.last_snapshot = None
        self.progress = None
        self._forward = None  # the train forward callable (speed options), built on first use
        # early stopping on test net 0's output (resnetc.early_stop_*); None when off
        self.early_stop = EarlyStopping.from_solver(param, self.file, self._test_output_names())
        self.stopped_early = False
        log.info("Solver scaffolding done.")

    # -- construction -------------------------------------------------------------------------------------
    def _check(self) -> None:
        p, f = self.param, self.file
        if p.HasField("solver_type"):
            if p.HasField("type"):
                raise ResnetcError("the solver sets both 'type' and the deprecated 'solver_type': keep 'type'", file=f)
            p.type = LEGACY_TYPES.get(p.solver_type, str(p.solver_type))
            p.ClearField("solver_type")
        rule_class(p.type, f).check(p, f)
        if p.average_loss < 1:
            raise ResnetcError(f"average_loss must be >= 1 (got {p.average_loss})", file=f)
        if p.iter_size < 1:
            raise ResnetcError(f"iter_size must be >= 1 (got {p.iter_size})", file=f)
        if p.regularization_type not in ("L1", "L2"):
            raise ResnetcError(f"unknown regularization_type '{p.regularization_type}' (L1 or L2)", file=f)
        check_policy(p, f)
        sources = [p.HasField("net"), p.HasField("net_param"), p.HasField("train_net"), p.HasField("train_net_param")]
        if sum(sources) == 0:
            raise ResnetcError("the solver names no net: give 'net: \"train_val.prototxt\"' in the solver or the net "
                               "on the command line (resnetc train NET SOLVER)", file=f)
        if sum(sources) > 1:
            raise ResnetcError("the solver names its train net more than once (net, net_param, train_net, "
                               "train_net_param): keep one", file=f)
        for i, n in enumerate(p.test_iter):
            if n <= 0:
                raise ResnetcError(f"test_iter #{i} must be > 0 (got {n})", file=f)
        if p.snapshot < 0:
            raise ResnetcError(f"snapshot must be >= 0 (got {p.snapshot})", file=f)
        if p.max_iter < 0:
            raise ResnetcError(f"max_iter must be >= 0 (got {p.max_iter})", file=f)

    def _probe_snapshot_prefix(self) -> None:
        p = self.param
        if p.snapshot <= 0 and not p.snapshot_after_train:
            return
        if not p.snapshot_prefix:
            if p.snapshot > 0:
                raise ResnetcError("snapshot is set but snapshot_prefix is not", file=self.file)
            return
        d = os.path.dirname(os.path.abspath(p.snapshot_prefix))
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            raise ResnetcError(f"cannot write to snapshot prefix '{p.snapshot_prefix}' (directory {d} is missing or "
                               f"not writable)", file=self.file)

    def _net_source(self, path: str) -> NetSource:
        return read_net(path)

    def _default_feed(self, graph, phase, index, seed, device):
        return pipeline_feed(graph, seed=seed, device=device)

    def _make_net(self, src: NetSource, state: caffe_pb2.NetState, phase: str, index):
        from ..net import CaffeNet

        graph = build_graph(src, phase, state=state)
        feed = self._feed_factory(graph, phase, index, self.seed, self.device)
        if not graph.shapes_known and hasattr(feed, "top_shapes"):
            shapes = feed.top_shapes()
            if shapes:
                graph = build_graph(src, phase, state=state, input_shapes=shapes)
        net = CaffeNet(graph, seed=self.seed)
        net.to(self.device)
        self.speed.prepare_net(net)  # speed hook: channels_last weights
        return net, feed

    @staticmethod
    def _state(phase: int, src: NetSource, extra: Optional[caffe_pb2.NetState]) -> caffe_pb2.NetState:
        st = caffe_pb2.NetState()
        st.phase = phase
        st.MergeFrom(src.param.state)
        if extra is not None:
            st.MergeFrom(extra)
        return st

    def _build_train_net(self):
        p = self.param
        if p.HasField("train_net_param") or p.HasField("net_param"):
            msg = p.train_net_param if p.HasField("train_net_param") else p.net_param
            src = NetSource(param=msg, file=self.file)
            log.info("Creating training net specified in %s.", "train_net_param" if p.HasField("train_net_param")
                     else "net_param")
        else:
            path = p.train_net if p.HasField("train_net") else p.net
            log.info("Creating training net from %s file: %s", "train_net" if p.HasField("train_net") else "net", path)
            src = self._net_source(path)
        st = self._state(caffe_pb2.TRAIN, src, p.train_state)
        net, feed = self._make_net(src, st, "TRAIN", None)
        if not net.has_loss:
            log.warning("the train net has no loss layer: training changes nothing")
        return net, feed

    def _test_sources(self) -> list:
        """[(NetSource, description)] of the test nets, in Caffe's order, with Caffe's count checks (run
        before any net is built, so a bad solver fails at once)."""
        p, f = self.param, self.file
        sources = [(NetSource(param=m, file=f), "test_net_param") for m in p.test_net_param]
        sources += [(self._net_source(path), f"test_net file: {path}") for path in p.test_net]
        n_explicit = len(sources)
        generic = p.HasField("net") or p.HasField("net_param")
        n_iter = len(p.test_iter)
        if generic:
            if n_iter < n_explicit:
                raise ResnetcError(f"{n_explicit} test nets but only {n_iter} test_iter values: give one test_iter "
                                   f"per test net", file=f)
            if n_iter > n_explicit:
                src = self._net_source(p.net) if p.HasField("net") else NetSource(param=p.net_param, file=f)
                what = f"net file: {p.net}" if p.HasField("net") else "net_param"
                sources += [(src, what)] * (n_iter - n_explicit)
        elif n_iter != n_explicit:
            raise ResnetcError(f"{n_explicit} test nets but {n_iter} test_iter values: give one test_iter per test "
                               f"net", file=f)
        if sources and p.test_interval <= 0:
            raise ResnetcError("the solver has test nets but no test_interval > 0 (set test_interval, or remove "
                               "test_iter to train without testing)", file=f)
        if len(p.test_state) not in (0, len(sources)):
            raise ResnetcError(f"{len(p.test_state)} test_state entries for {len(sources)} test nets: give none or "
                               f"one per test net", file=f)
        return sources

    def _build_test_nets(self, sources):
        p = self.param
        nets, feeds = [], []
        for i, (src, what) in enumerate(sources):
            log.info("Creating test net (#%d) specified by %s", i, what)
            st = self._state(caffe_pb2.TEST, src, p.test_state[i] if len(p.test_state) else None)
            net, feed = self._make_net(src, st, "TEST", i)
            nets.append(net)
            feeds.append(feed)
        return nets, feeds, list(p.test_iter)

    def _test_output_names(self):
        """Output blob names of test net 0 (None where this process builds no test nets)."""
        return self.test_nets[0].outputs if self.test_nets else None

    def _active_params(self) -> list:
        """(history index, param, local lr factor, local decay) of the params the update can change."""
        decay = f32(self.param.weight_decay)
        out = []
        for i, (lname, bi, p, lr_mult, decay_mult) in enumerate(self._learnable):
            layer = self.net.graph.layer(lname)
            blob = layer.blobs[bi]
            if lr_mult == 0 or not blob.learnable:
                continue  # Caffe's step is rate·0 (or BatchNorm's lr 0): exactly nothing
            out.append((i, p, f32(lr_mult), float(f32(decay * f32(decay_mult)))))
        return out

    # -- weights ------------------------------------------------------------------------------------------
    def load_weights(self, path: str) -> None:
        """``--weights``/solver ``weights``: copy by layer name into the train net and every test net."""
        from ..weights import load_caffemodel

        log.info("Finetuning from %s", path)
        load_caffemodel(self.net, path)
        for net in self.test_nets:
            log.info("Finetuning from %s", path)
            load_caffemodel(net, path)

    def share_weights(self, test_net) -> None:
        """Caffe's ``ShareTrainedLayersWith``: test layers named like train layers alias their blobs."""
        train_params = self.net.params
        for name, tparams in test_net.params.items():
            src = train_params.get(name)
            if src is None:
                continue
            if len(src) != len(tparams):
                layer = test_net.graph.layer(name)
                raise layer.error(f"has {len(tparams)} parameter blobs in the test net but {len(src)} in the train "
                                  f"net: layers with the same name must match")
            for j, (a, b) in enumerate(zip(src, tparams)):
                if a is b:
                    continue
                if a.shape != b.shape:
                    layer = test_net.graph.layer(name)
                    raise layer.error(f"blob {j} has shape {tuple(b.shape)} in the test net but {tuple(a.shape)} in "
                                      f"the train net: layers with the same name must match")
                b.data = a.data

    # -- training -----------------------------------------------------------------------------------------
    def solve(self, resume: Optional[str] = None) -> None:
        p = self.param
        log.info("Solving %s", self.net.graph.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        if resume:
            log.info("Restoring previous solver status from %s", resume)
            self.restore(resume)
        start_iter = self.iter
        self.stopped_early = False
        self.progress = ProgressBar.maybe(p.max_iter, self.iter) if self.is_root else None
        try:
            if self.progress:
                with self.progress:
                    self.step(p.max_iter - self.iter)
            else:
                self.step(p.max_iter - self.iter)
        finally:
            self.progress = None
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.stopped_early:
            log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            with torch.no_grad():
                self.net(**self.train_feed())
                loss = f32(self.net.total_loss().item())
            self._update_smoothed(loss, start_iter)
            log.info("Iteration %d, loss = %s", self.iter, g(self._smoothed))
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    def step(self, iters: int) -> None:
        p = self.param
        start = self.iter
        stop = start + iters
        self._losses = []
        self._smoothed = f32(0)
        timer = time.perf_counter()
        last_display = start
        iter_size = p.iter_size
        while self.iter < stop:
            self._zero_grads()
            if p.test_interval and self.iter % p.test_interval == 0 and (self.iter > 0 or p.test_initialization):
                results = self.test_all()
                if self.early_stop is not None and self._early_stop_due(results):
                    self.stopped_early = True
                    break
            display = bool(p.display) and self.iter % p.display == 0
            loss = f32(0)
            for _ in range(iter_size):
                loss = f32(loss + f32(self._forward_backward()))
            loss = f32(loss / f32(iter_size))
            if not math.isfinite(float(loss)):
                self._diverged(loss)
            self._last_finite = (self.iter, loss)
            self._update_smoothed(loss, start)
            if display:
                lapse = round(time.perf_counter() - timer, 3)
                per_s = f32(self.iter - last_display) / f32(lapse if lapse else 1)
                log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter, g(per_s), g(lapse),
                         p.display, g(self._smoothed))
                timer = time.perf_counter()
                last_display = self.iter
                self._log_train_outputs()
            # speed hook: with fp16 loss scaling, unscale first; an update with inf/NaN gradients is skipped
            self.speed.update(lambda: self.apply_update(display), self._active)
            self.iter += 1
            if self.progress is not None:
                self.progress.update(self.iter, self._smoothed)
            if p.snapshot and self.iter % p.snapshot == 0:
                self.snapshot()

    def _zero_grads(self) -> None:
        for _, _, prm, _, _ in self._learnable:
            prm.grad = None

    def _train_forward(self, batch: dict) -> dict:
        """Hook: the train forward (speed options here; DDP in resnetc.solver.distributed)."""
        if self._forward is None:
            self._forward = self.speed.forward_fn(self.net)
        with self.speed.autocast():
            return self._forward(**self.speed.inputs(batch))

    def _forward_backward(self) -> float:
        outs = self._train_forward(self.train_feed())
        loss = self.net.total_loss()
        if loss.requires_grad:
            self.speed.backward(loss)  # speed hook: fp16 loss scaling
        self._last_outputs = outs
        return loss.item()

    def _update_smoothed(self, loss, start: int) -> None:
        """Caffe's ``UpdateSmoothedLoss`` in float32: running mean until the window is full, then the
        incremental update (rounding drift kept)."""
        window = self.param.average_loss
        loss = f32(loss)
        if len(self._losses) < window:
            self._losses.append(loss)
            size = f32(len(self._losses))
            self._smoothed = f32((self._smoothed * (size - f32(1)) + loss) / size)
        else:
            k = (self.iter - start) % window
            self._smoothed = f32(self._smoothed + (loss - self._losses[k]) / f32(window))
            self._losses[k] = loss

    def _log_train_outputs(self) -> None:
        if not self._last_outputs:
            return
        from .testing import flat_outputs, loss_note

        names, vec = flat_outputs(self._last_outputs)
        for k, (name, v) in enumerate(zip(names, vec)):
            log.info("    Train net output #%d: %s = %s%s", k, name, g(v), loss_note(self._train_weights.get(name, 0), v))

    def _diverged(self, loss) -> None:
        where = f"at iteration {self.iter}"
        last = (f"; the last finite loss was {g(self._last_finite[1])} at iteration {self._last_finite[0]}"
                if self._last_finite else "")
        snap = (f"; the last snapshot ({self.last_snapshot}) is kept" if self.last_snapshot else
                "; no snapshot was written")
        raise ResnetcError(f"training diverged {where}: loss = {g(loss)}{last}{snap} (lower base_lr or set "
                           f"clip_gradients)", file=self.file)

    @torch.no_grad()
    def apply_update(self, display: bool = False) -> None:
        """``SGDSolver::ApplyUpdate``: rate, clip, then per param normalize → regularize → rule → w -= step."""
        p = self.param
        rate, self.current_step, note = learning_rate(p, self.iter, self.current_step)
        if note:
            log.info("%s", note)
        if display:
            log.info("Iteration %d, lr = %s", self.iter, g(rate))
        scale = self._clip_scale()
        norm = f32(1) / f32(p.iter_size) if p.iter_size != 1 else None
        l1 = p.regularization_type == "L1"
        rule, it = self.rule, self.iter
        for i, prm, lr_mult, local_decay in self._active:
            grad = prm.grad
            if grad is None:
                grad = torch.zeros_like(prm)
            if scale is not None:
                grad.mul_(scale)
            if norm is not None:
                grad.mul_(float(norm))
            if local_decay:
                grad.add_(torch.sign(prm) if l1 else prm, alpha=local_decay)
            prm.sub_(rule.step(i, grad, float(f32(rate * lr_mult)), it))

    def _clip_scale(self):
        clip = f32(self.param.clip_gradients)
        if clip < 0:
            return None
        grads = [prm.grad for _, prm, _, _ in self._active if prm.grad is not None]
        if not grads:
            return None
        sumsq = torch.stack([torch.dot(gr.reshape(-1), gr.reshape(-1)) for gr in grads]).sum()
        l2 = f32(math.sqrt(float(f32(sumsq.item()))))
        if l2 > clip:
            scale = f32(clip / l2)
            log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s", g(l2), g(clip),
                     g(scale))
            return float(scale)
        return None

    # -- testing ------------------------------------------------------------------------------------------
    def _early_stop_due(self, results: list) -> bool:
        """After a test pass: feed test net 0's results to the early-stopping rule; True to stop now."""
        return bool(results) and self.early_stop.update(results[0], self.iter, log)

    def test_all(self) -> list:
        return [self.test(k) for k in range(len(self.test_nets))]

    def test(self, k: int) -> list:
        log.info("Iteration %d, Testing net (#%d)", self.iter, k)
        net = self.test_nets[k]
        self.share_weights(net)
        return test_pass(net, self.test_feeds[k], self.test_iters[k], compute_loss=self.param.test_compute_loss,
                         log=log, weights=self._test_weights[k])

    # -- snapshots ----------------------------------------------------------------------------------------
    def snapshot_filename(self, ext: str) -> str:
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{ext}"

    def snapshot(self) -> str:
        from ..weights import save_caffemodel, save_caffemodel_h5

        p = self.param
        hdf5 = p.snapshot_format == caffe_pb2.SolverParameter.HDF5
        if hdf5:
            model = self.snapshot_filename(".caffemodel.h5")
            log.info("Snapshotting to HDF5 file %s", model)
        else:
            model = self.snapshot_filename(".caffemodel")
            log.info("Snapshotting to binary proto file %s", model)
        (save_caffemodel_h5 if hdf5 else save_caffemodel)(self.net, model, write_diff=p.snapshot_diff)
        if hdf5:
            st = self.snapshot_filename(".solverstate.h5")
            log.info("Snapshotting solver state to HDF5 file %s", st)
            _state.write_solverstate_h5(st, self.iter, model, self.rule.history, self.current_step)
        else:
            st = self.snapshot_filename(".solverstate")
            log.info("Snapshotting solver state to binary proto file %s", st)
            _state.write_solverstate(st, self.iter, model, self.rule.history, self.current_step)
        self.last_snapshot = st
        return st

    def restore(self, path: str) -> None:
        """``Solver::Restore``: iter, the model (``learned_net``), current_step and the history blobs."""
        from ..weights import load_caffemodel

        st = _state.read_solverstate(path)
        model = st.learned_net
        if model and not os.path.exists(model):
            alt = os.path.join(os.path.dirname(path), os.path.basename(model))
            if os.path.exists(alt):
                model = alt
        self.iter = st.iter
        if model:
            load_caffemodel(self.net, model)
        self.current_step = st.current_step
        if len(st.history) != len(self.rule.history):
            raise ResnetcError(f"incorrect length of history blobs: the state has {len(st.history)}, this solver "
                               f"({self.param.type}, {len(self._learnable)} learnable params) needs "
                               f"{len(self.rule.history)}", file=path)
        log.info("SGDSolver: restoring history")
        with torch.no_grad():
            for i, (h, arr) in enumerate(zip(self.rule.history, st.history)):
                if arr.size != h.numel() or (st.exact_shapes and tuple(arr.shape) != tuple(h.shape)):
                    raise ResnetcError(f"history blob {i} has shape {tuple(arr.shape)}, the param has "
                                       f"{tuple(h.shape)}", file=path)
                h.copy_(torch.from_numpy(np.ascontiguousarray(arr)).reshape(h.shape))

    def close(self) -> None:
        for feed in [self.train_feed] + list(self.test_feeds):
            close = getattr(feed, "close", None)
            if close:
                close()
