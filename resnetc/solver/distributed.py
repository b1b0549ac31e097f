"""``DistributedSolver``: Caffe's multi-GPU training (``caffe train -gpu 0,1``) on torch.distributed.

Caffe's meaning is kept (``parallel.cpp``, ``solver.cpp``):

* every rank reads ``batch_size`` images per sub-batch, so the effective batch is ``batch_size × world``;
  TRAIN data layers are sharded round-robin (record ``i`` goes to rank ``i % world``, Caffe's
  ``DataLayer::Skip``), so no record is seen twice in an epoch; TEST data is read by rank 0 only;
* the random seed of rank ``r`` is ``random_seed + r`` (Caffe's ``set_random_seed(seed + solver_rank)``:
  different dropout masks and crops per rank); the weights start as rank 0's (DDP broadcasts them);
* the forward runs through ``DistributedDataParallel``: gradients are averaged over the ranks after the
  last of the ``iter_size`` sub-batches (``no_sync`` before it) — Caffe's NCCL sum × 1/solver_count — and
  then Caffe's clip → ÷ iter_size → decay → rule runs identically on every rank;
* only rank 0 logs, tests and snapshots; the other ranks wait for it outside any collective, so a long
  test pass does not trip the collective timeout; a snapshot resumes on any number of ranks (rank 0 reads
  it and broadcasts weights, history, iter and current_step);
* BatchNorm statistics stay per rank, as in Caffe (each GPU's layer averages its own batches; the snapshot
  holds rank 0's): they are parameters without gradient, which DDP leaves alone after the first broadcast.

A failure of a collective (a peer died, a timeout) becomes one :class:`ResnetcError` line.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Optional

import torch

from ..distributed import RankEnv, collective_errors
from ..errors import ResnetcError
from ..proto import caffe_pb2
from ..prototxt import read_solver
from .core import Solver, default_snapshot_prefix

log = logging.getLogger("resnetc.solver")


class DistributedSolver(Solver):
    """A :class:`Solver` for one rank of a torch.distributed run (the process group must be initialized)."""

    def __init__(self, solver, *, env: RankEnv, solver_file: Optional[str] = None, **kw):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("DistributedSolver needs an initialized process group (resnetc.distributed)")
        if isinstance(solver, caffe_pb2.SolverParameter):
            param = caffe_pb2.SolverParameter()
            param.CopyFrom(solver)
        else:
            solver_file = os.fspath(solver)
            param = read_solver(solver_file)
            default_snapshot_prefix(param, solver_file)
        if param.random_seed >= 0:
            param.random_seed += env.rank  # Caffe: set_random_seed(random_seed + solver_rank)
        self.env = env
        self.rank, self.world = env.rank, env.world
        self.is_root = env.rank == 0
        self._sub_batch = 0
        self._waits = 0
        self._n_test_nets = 0
        if param.resnetc.sync_batchnorm:
            raise ResnetcError("sync_batchnorm is not supported yet: BatchNorm statistics are kept per process, "
                               "as in Caffe's multi-GPU training (remove sync_batchnorm)", file=solver_file)
        super().__init__(param, solver_file=solver_file, **kw)
        self.ddp = self._wrap()
        log.info("Distributed training: %d processes × batch per process = the effective batch", self.world)

    # -- construction -------------------------------------------------------------------------------------
    def _default_feed(self, graph, phase, index, seed, device):
        feed = super()._default_feed(graph, phase, index, seed, device)
        if phase == "TRAIN":  # Caffe skips records on TRAIN only; TEST data is read by rank 0 alone
            for pipe in getattr(feed, "pipelines", {}).values():
                shard = getattr(pipe, "shard", None)
                if shard is not None:
                    shard(self.rank, self.world)
        return feed

    def _build_test_nets(self, sources):
        self._n_test_nets = len(sources)
        if not self.is_root:  # Caffe builds test nets on the root solver only
            return [], [], list(self.param.test_iter)
        return super()._build_test_nets(sources)

    def _wrap(self):
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        with collective_errors(self.env, "broadcasting rank 0's weights"):
            return DDP(self.net, device_ids=device_ids, broadcast_buffers=False,
                       find_unused_parameters=bool(unused_params(self.net)))

    # -- training -----------------------------------------------------------------------------------------
    def _zero_grads(self) -> None:
        super()._zero_grads()
        self._sub_batch = 0

    def _train_forward(self, batch: dict) -> dict:
        if self._forward is None:
            self._forward = self.speed.forward_fn(self.ddp)
        return super()._train_forward(batch)

    def _forward_backward(self) -> float:
        self._sub_batch += 1
        sync = self._sub_batch >= self.param.iter_size  # average over ranks after the last sub-batch only
        with (contextlib.nullcontext() if sync else self.ddp.no_sync()), \
                collective_errors(self.env, f"averaging gradients at iteration {self.iter}"):
            return super()._forward_backward()

    def solve(self, resume: Optional[str] = None) -> None:
        super().solve(resume)
        self.check_replicas()

    def check_replicas(self) -> float:
        """Largest |w_rank − w_rank0| over the learnable weights of all ranks (0 when DDP kept the replicas in
        step, as it must); rank 0 logs it, and warns when it is not 0. BatchNorm statistics are per rank and
        not compared."""
        import torch.distributed as dist

        worst = torch.zeros((), dtype=torch.float64, device=self.device)
        with collective_errors(self.env, "comparing the weights of the ranks"), torch.no_grad():
            for _, prm, _, _ in self._active:
                ref = prm.detach().clone()
                broadcast_(ref)
                worst = torch.maximum(worst, (prm.detach() - ref).abs().max().double())
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        diff = float(worst)
        if not self.is_root:
            return diff
        if diff == 0:
            log.info("All %d processes hold the same weights after iteration %d", self.world, self.iter)
        else:
            log.warning("the processes' weights differ after iteration %d: max |w - w_rank0| = %g", self.iter, diff)
        return diff

    # -- rank 0 only: tests and snapshots -----------------------------------------------------------------
    def test_all(self) -> list:
        if not self._n_test_nets:
            return []
        results = super().test_all() if self.is_root else []
        self._wait_for_root("test")
        return results

    def _early_stop_due(self, results: list) -> bool:
        """Rank 0 decides from its test pass; every rank gets the decision, so all leave the loop together."""
        import torch.distributed as dist

        stop = super()._early_stop_due(results) if self.is_root else False
        with collective_errors(self.env, f"sharing the early-stopping decision at iteration {self.iter}"):
            flag = torch.tensor([int(stop)], dtype=torch.int64, device=self.device)
            dist.broadcast(flag, 0)
        return bool(flag.item())

    def snapshot(self) -> Optional[str]:
        path = super().snapshot() if self.is_root else None
        self._wait_for_root("snapshot")
        return path

    def _wait_for_root(self, what: str) -> None:
        """The other ranks wait (polling the rendezvous store, not in a collective with a timeout) until rank 0
        has finished ``what``; if rank 0 dies meanwhile the store connection fails and they stop."""
        import torch.distributed as dist

        self._waits += 1
        key = f"resnetc/{what}/{self._waits}"
        with collective_errors(self.env, f"waiting for rank 0 to {what} at iteration {self.iter}"):
            store = dist.distributed_c10d._get_default_store()
            if self.is_root:
                store.set(key, "1")
                return
            while not store.check([key]):
                time.sleep(0.05)

    # -- resume -------------------------------------------------------------------------------------------
    def restore(self, path: str) -> None:
        """Rank 0 reads the snapshot; every rank then takes rank 0's weights, history, iter and current_step
        (so a snapshot resumes on any number of ranks, and only rank 0 needs the files)."""
        import torch.distributed as dist

        if self.is_root:
            super().restore(path)
        with collective_errors(self.env, f"restoring {path}"):
            counters = torch.tensor([self.iter, self.current_step], dtype=torch.int64, device=self.device)
            dist.broadcast(counters, 0)
            self.iter, self.current_step = int(counters[0]), int(counters[1])
            for t in list(self.net.parameters()) + list(self.rule.history):
                broadcast_(t.data)


def broadcast_(t: torch.Tensor) -> None:
    """``dist.broadcast`` from rank 0 into ``t`` in place (also for channels_last tensors)."""
    import torch.distributed as dist

    if t.is_contiguous():
        dist.broadcast(t, 0)
        return
    buf = t.contiguous()
    dist.broadcast(buf, 0)
    t.copy_(buf)


def unused_params(net) -> list:
    """Names of layers holding gradient-requiring params that no loss depends on (then DDP must look for
    unused parameters every iteration; otherwise it need not). Follows bottoms back from the loss tops, not
    through ``propagate_down: false`` bottoms or bottoms a layer type never back-propagates to."""
    graph = net.graph
    producer = {}
    for layer in graph.layers:
        for t in layer.tops:
            producer[t] = layer
    needed = [ssa for ssa, _ in net._loss_terms]
    reached = set()
    while needed:
        layer = producer.get(needed.pop())
        if layer is None or layer.name in reached:
            continue
        reached.add(layer.name)
        pd = list(layer.param.propagate_down)
        no_grad = set(getattr(layer.spec, "no_grad_bottoms", ()) or ())
        for j, b in enumerate(layer.bottoms):
            if (pd and not pd[j]) or j in no_grad:
                continue
            needed.append(b)
    out = []
    for name, params in net.params.items():
        if name not in reached and any(p.requires_grad for p in params):
            out.append(name)
    return out
