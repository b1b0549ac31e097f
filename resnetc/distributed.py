"""Multi-process training on ``torch.distributed``: the rank environment, process-group setup and the
single-machine launcher behind ``resnetc train --gpu 0,1`` / ``--nproc N``.

A rank is a process with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in
its environment — set by :func:`launch` (one machine) or by ``torchrun`` (several machines: ``torchrun
--nnodes … --nproc-per-node … -m resnetc train …``). The backend is NCCL on GPUs and gloo on the CPU.
Collectives time out after ``timeout`` seconds (default :data:`DEFAULT_TIMEOUT`), so a rank whose peer
died or hung stops with one error line instead of waiting forever.

:func:`launch` starts one child per rank running the same command line, watches them, and when one dies
stops the others and raises one :class:`ResnetcError` naming the rank, how it ended and the last snapshot to
resume from.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

from .errors import ResnetcError

log = logging.getLogger("resnetc.distributed")

DEFAULT_TIMEOUT = 120.0  # seconds a collective may wait for a peer
GRACE = 5.0  # seconds survivors get to exit after SIGTERM before SIGKILL
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class RankEnv:
    """This process's place in a distributed run (from the environment)."""

    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ=None) -> Optional["RankEnv"]:
        """The rank environment set by :func:`launch` or torchrun, or None when this is a plain process."""
        env = os.environ if environ is None else environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", rank))
            port = int(env.get("MASTER_PORT", "29500"))
        except ValueError:
            raise ResnetcError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers "
                               f"(got RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r})") from None
        if world < 1 or not 0 <= rank < world:
            raise ResnetcError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
        return cls(rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), port)


def backend_for(device) -> str:
    return "nccl" if getattr(device, "type", str(device)) == "cuda" else "gloo"


def init_process_group(env: RankEnv, device, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Join the run's process group (NCCL on CUDA devices, gloo otherwise) with a bounded timeout."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    with collective_errors(env, "joining the process group"):
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world,
                                timeout=datetime.timedelta(seconds=timeout))
    if env.rank != 0:  # only rank 0 logs (Caffe's root solver); warnings and errors still show
        logging.getLogger("resnetc").setLevel(logging.WARNING)
    log.info("Process group: %d processes (%s), this is rank %d", env.world, backend, env.rank)


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _is_collective_error(e: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and bool(re.search(
        r"gloo|nccl|Connection (closed|reset)|timed? ?out|Broken pipe|ProcessGroup|store|socket", text, re.I))


@contextlib.contextmanager
def collective_errors(env: Optional[RankEnv], doing: str):
    """Turn a failure of torch.distributed (a peer died, a timeout) into one :class:`ResnetcError` line."""
    try:
        yield
    except ResnetcError:
        raise
    except Exception as e:  # torch raises RuntimeError subclasses (DistBackendError, DistNetworkError, ...)
        if not _is_collective_error(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        who = f"rank {env.rank} of {env.world}" if env is not None else "this rank"
        raise ResnetcError(f"distributed training stopped while {doing} ({who}): another process died or "
                           f"stopped answering ({first[:200]})") from None


# -- the launcher ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_snapshot(prefix: Optional[str]) -> Optional[str]:
    """The solver state with the highest iteration written under ``<prefix>_iter_N``, or None."""
    if not prefix:
        return None
    best, best_iter = None, -1
    for path in glob.glob(glob.escape(prefix) + "_iter_*.solverstate*"):
        m = re.search(r"_iter_(\d+)\.solverstate(\.h5)?$", path)
        if m and int(m.group(1)) > best_iter:
            best, best_iter = path, int(m.group(1))
    return best


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def child_command(argv: Optional[Sequence[str]] = None) -> list:
    """The command a rank runs: this same ``resnetc`` command line, as ``python -m resnetc ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return [sys.executable, "-m", "resnetc", *args]


def launch(world: int, *, argv: Optional[Sequence[str]] = None, snapshot_prefix: Optional[str] = None,
           poll: float = 0.1, grace: float = GRACE, env=None) -> None:
    """Run ``world`` ranks of this command on this machine and wait for them.

    Returns when every rank exited 0. When a rank fails, the others are stopped (SIGTERM, then SIGKILL after
    ``grace`` seconds) and one :class:`ResnetcError` says which rank, how it ended and where to resume.
    """
    cmd = child_command(argv)
    port = free_port()
    base = dict(os.environ if env is None else env)
    for k in _ENV_KEYS:
        base.pop(k, None)
    if "OMP_NUM_THREADS" not in base:  # share the cores instead of oversubscribing them (as torchrun does)
        base["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    procs = []
    log.info("Starting %d processes (master 127.0.0.1:%d)", world, port)
    try:
        for rank in range(world):
            child_env = dict(base, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                             LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen(cmd, env=child_env))
            log.info("rank %d: pid %d", rank, procs[-1].pid)
        failed = _watch(procs, poll)
    except KeyboardInterrupt:
        _stop(procs, grace)
        raise
    if failed is None:
        return
    rank, code = failed
    _stop(procs, grace)
    snap = latest_snapshot(snapshot_prefix)
    resume = (f"; resume with --snapshot {snap}" if snap else "; no snapshot was written yet")
    raise ResnetcError(f"rank {rank} of {world} {describe_exit(code)}: the other processes were stopped{resume}")


def _watch(procs: list, poll: float):
    """Wait until all exit 0 (-> None) or one fails (-> (rank, exit code) of the first failure seen)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
        if failed:  # a rank killed by a signal is the cause; the others' errors are its consequence
            return min(failed, key=lambda rc: (rc[1] >= 0, rc[0]))
        if all(c is not None for c in codes):
            return None
        time.sleep(poll)


def _stop(procs: list, grace: float) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


def finish(env: Optional[RankEnv]) -> None:
    """End of training: wait for every rank (rank 0 hosts the rendezvous store, so it must not leave while
    others still use it), then leave the process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        with collective_errors(env, "finishing"):
            dist.barrier()
    destroy_process_group()


def gpu_ids(spec: Optional[str]) -> Optional[list]:
    """``--gpu`` as a list of CUDA ids (``all`` = every visible device), or None for ``cpu``/unset."""
    if spec is None or spec.strip().lower() in ("", "cpu"):
        return None
    spec = spec.strip().lower()
    if spec == "all":
        import torch

        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ResnetcError(f"--gpu: expected device ids like 0 or 0,1, 'all' or 'cpu', got '{spec}'") from None
    if not ids:
        raise ResnetcError(f"--gpu: no device in '{spec}'")
    return ids


def rank_device(env: RankEnv, spec: Optional[str]):
    """The device of a rank: ``cuda:<ids[LOCAL_RANK]>`` when ``--gpu`` names devices (and CUDA exists), else
    the CPU."""
    import torch

    ids = gpu_ids(spec)
    if not ids or not torch.cuda.is_available():
        if ids:
            log.warning("CUDA is not available: rank %d trains on the CPU (--gpu %s ignored)", env.rank, spec)
        return torch.device("cpu")
    if env.local_rank >= len(ids):
        raise ResnetcError(f"LOCAL_RANK {env.local_rank} has no device in --gpu {spec} ({len(ids)} given): "
                           f"start at most one process per listed GPU")
    dev = ids[env.local_rank]
    if dev >= torch.cuda.device_count():
        raise ResnetcError(f"--gpu {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", dev)
