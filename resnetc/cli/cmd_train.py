"""``resnetc train [NET] SOLVER`` and ``resnetc test NET --weights W`` (Caffe's ``caffe train`` / ``caffe test``)."""
from __future__ import annotations

import logging
import os

import click

from ..errors import ResnetcError

log = logging.getLogger("resnetc.solver")


def resolve_device(gpu, solver_param=None):
    """``--gpu 0|all|cpu`` (or the solver's explicit ``solver_mode: GPU``) -> torch.device, with Caffe's
    "Use CPU." line, or one clear line when CUDA is asked for but not present."""
    import torch

    from ..proto import caffe_pb2

    if gpu is None and solver_param is not None and solver_param.HasField("solver_mode") and \
            solver_param.solver_mode == caffe_pb2.SolverParameter.GPU:
        gpu = str(solver_param.device_id)
    if gpu is None or gpu.strip().lower() == "cpu":
        log.info("Use CPU.")
        return torch.device("cpu")
    spec = gpu.strip().lower()
    if not torch.cuda.is_available():
        log.warning("CUDA is not available on this machine: training on the CPU instead (--gpu %s ignored)", gpu)
        return torch.device("cpu")
    if spec == "all":
        ids = list(range(torch.cuda.device_count()))
    else:
        try:
            ids = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ResnetcError(f"--gpu: expected device ids like 0 or 0,1, 'all' or 'cpu', got '{gpu}'") from None
    if not ids:
        raise ResnetcError(f"--gpu: no device in '{gpu}'")
    if len(ids) > 1:
        raise ResnetcError(f"--gpu {gpu}: training on several GPUs is not supported yet; give one device id")
    if ids[0] >= torch.cuda.device_count():
        raise ResnetcError(f"--gpu {gpu}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    log.info("Using GPUs %d", ids[0])
    log.info("GPU %d: %s", ids[0], torch.cuda.get_device_name(ids[0]))
    return torch.device("cuda", ids[0])


def _split(value):
    return [s.strip() for s in value.split(",") if s.strip()] if value else []


def _add_log_file(path):
    if path:
        from . import setup_logging

        setup_logging(logging.getLogger("resnetc").level or logging.INFO, path)


@click.command("train")
@click.argument("files", nargs=-1, metavar="[NET] SOLVER")
@click.option("--solver", "solver_opt", help="Solver prototxt (instead of the SOLVER argument).")
@click.option("--weights", help="Fine-tune from A.caffemodel[,B.caffemodel] (copied by layer name).")
@click.option("--snapshot", "resume", help="Resume from a .solverstate[.h5].")
@click.option("--gpu", help="Device: 0, 0,1, all or cpu (default: the solver's solver_mode, else CPU).")
@click.option("--iterations", "--max-iter", "max_iter", type=int, help="Override the solver's max_iter.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), help="Also write the log to FILE.")
@click.option("--level", type=int, default=0, show_default=True, help="Net state level of the train net.")
@click.option("--stage", help="Comma-separated net state stages of the train net.")
@click.option("--early-stop", "early_stop", metavar="OUTPUT:PATIENCE[:min|max]",
              help="Stop when test net 0's OUTPUT (e.g. accuracy:5, loss:3:min) has not improved for PATIENCE "
                   "test passes; overrides the solver's resnetc.early_stop_*.")
# -- multi-process training and speed options (resnetc.distributed, resnetc.solver.speed) --
@click.option("--nproc", type=int, help="Train with N CPU processes (gloo); each reads batch_size images.")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), help="Autocast the train forward (fp16 adds "
              "loss scaling); overrides the solver's resnetc.amp.")
@click.option("--channels-last", "channels_last", is_flag=True, default=None, help="NHWC weights and inputs.")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the train forward.")
@click.option("--dist-timeout", type=float, default=120.0, show_default=True,
              help="Seconds a process waits for the others in a collective before giving up.")
def train_cmd(files, solver_opt, weights, resume, gpu, max_iter, log_file, level, stage, early_stop, nproc, amp,
              channels_last, compile_, dist_timeout):
    """Train a net with Caffe's solver semantics: resnetc train [NET] SOLVER."""
    from ..prototxt import read_solver

    files = list(files)
    if solver_opt:
        if len(files) > 1:
            raise ResnetcError("give the solver once: resnetc train [NET] SOLVER, or --solver SOLVER [NET]")
        net, solver_path = (files[0] if files else None), solver_opt
    elif len(files) == 2:
        net, solver_path = files
    elif len(files) == 1:
        net, solver_path = None, files[0]
    else:
        raise ResnetcError("usage: resnetc train [NET] SOLVER (a solver prototxt is required)")
    if resume and weights:
        raise ResnetcError("give either --snapshot (resume) or --weights (fine-tune), not both")
    if resume and not os.path.exists(resume):
        raise ResnetcError("no such solver state file (--snapshot)", file=resume)
    _add_log_file(log_file)
    param = read_solver(solver_path)
    if early_stop is not None:  # checked before torch is imported: a typo fails at once
        _early_stop_flag(param, early_stop)

    from ..solver import Solver
    from ..solver.core import default_snapshot_prefix

    default_snapshot_prefix(param, solver_path)
    if max_iter is not None:
        if max_iter < 0:
            raise ResnetcError(f"--iterations must be >= 0 (got {max_iter})")
        param.max_iter = max_iter
    if resume:
        param.ClearField("weights")
    _speed_flags(param, amp, channels_last, compile_)
    # -- multi-process: start the ranks here (--nproc / several --gpu ids), or be one (launched / torchrun) --
    from .. import distributed as dist_

    rank_env = dist_.RankEnv.from_environ()
    if rank_env is None:
        world = _world_size(nproc, gpu)
        if world > 1:
            dist_.launch(world, snapshot_prefix=param.snapshot_prefix)
            return
        device = resolve_device(gpu, param)
    else:
        device = dist_.rank_device(rank_env, gpu)
        dist_.init_process_group(rank_env, device, timeout=dist_timeout)
    kw = dict(solver_file=solver_path, net=net, weights=_split(weights) if weights else None, device=device,
              level=level, stages=_split(stage))
    if rank_env is None:
        solver = Solver(param, **kw)
    else:
        from ..solver.distributed import DistributedSolver

        solver = DistributedSolver(param, env=rank_env, **kw)
    try:
        with dist_.collective_errors(rank_env, "training"):
            if resume:  # caffe train: Restore before "Starting Optimization", then Solve() without a file
                log.info("Resuming from %s", resume)
                solver.restore(resume)
            log.info("Starting Optimization")
            solver.solve()
        log.info("Optimization Done.")
        if rank_env is not None:
            dist_.finish(rank_env)
    finally:
        solver.close()
        if rank_env is not None:
            dist_.destroy_process_group()


def _early_stop_flag(param, value: str) -> None:
    """``--early-stop OUTPUT:PATIENCE[:min|max]`` -> the solver's ``resnetc.early_stop_*`` fields."""
    parts = value.split(":")
    usage = f"--early-stop: expected OUTPUT:PATIENCE[:min|max], e.g. accuracy:5 or loss:3:min, got '{value}'"
    if len(parts) not in (2, 3) or not parts[0].strip():
        raise ResnetcError(usage)
    try:
        patience = int(parts[1])
    except ValueError:
        raise ResnetcError(usage) from None
    if patience <= 0:
        raise ResnetcError(f"--early-stop: PATIENCE must be > 0, got {patience}")
    mode = parts[2].strip().lower() if len(parts) == 3 else "max"
    if mode not in ("max", "min"):
        raise ResnetcError(f"--early-stop: the mode must be min or max, got '{parts[2]}'")
    param.resnetc.early_stop_output = parts[0].strip()
    param.resnetc.early_stop_patience = patience
    param.resnetc.early_stop_mode = mode


def _speed_flags(param, amp, channels_last, compile_):
    """CLI speed flags override the solver's ``resnetc`` extension fields."""
    if amp is not None:
        param.resnetc.amp = "" if amp == "off" else amp
    if channels_last is not None:
        param.resnetc.channels_last = channels_last
    if compile_ is not None:
        param.resnetc.compile = compile_


def _world_size(nproc, gpu) -> int:
    """Processes to start on this machine: --nproc N (CPU), or one per --gpu id when CUDA is present."""
    import torch

    from ..distributed import gpu_ids

    if nproc is not None:
        if nproc < 1:
            raise ResnetcError(f"--nproc must be >= 1 (got {nproc})")
        if gpu_ids(gpu):
            raise ResnetcError("give --gpu IDS (one process per GPU) or --nproc N (CPU processes), not both")
        return nproc
    ids = gpu_ids(gpu)
    if ids is not None and len(ids) > 1 and torch.cuda.is_available():
        return len(ids)
    return 1


@click.command("test")
@click.argument("net", metavar="NET")
@click.option("--weights", required=True, help="The .caffemodel to evaluate.")
@click.option("--iterations", type=int, default=50, show_default=True, help="Number of batches.")
@click.option("--gpu", help="Device: 0 or cpu.")
@click.option("--level", type=int, default=0, show_default=True)
@click.option("--stage", help="Comma-separated net state stages.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), help="Also write the log to FILE.")
def test_cmd(net, weights, iterations, gpu, level, stage, log_file):
    """Score a trained net (TEST phase) over N batches, like caffe test."""
    from ..graph import build_graph
    from ..net import CaffeNet
    from ..prototxt import read_net
    from ..solver.feeds import pipeline_feed
    from ..solver.testing import run_test_command
    from ..weights import load_caffemodel

    if iterations <= 0:
        raise ResnetcError(f"--iterations must be > 0 (got {iterations})")
    _add_log_file(log_file)
    device = resolve_device(gpu)
    src = read_net(net)
    graph = build_graph(src, "TEST", level=level, stages=_split(stage))
    feed = pipeline_feed(graph, device=device)
    if not graph.shapes_known:
        shapes = feed.top_shapes()
        if shapes:
            graph = build_graph(src, "TEST", level=level, stages=_split(stage), input_shapes=shapes)
    if graph.inputs and not graph.data_tops:
        raise ResnetcError("the net has Input layers but no data layers: resnetc test needs data layers to read "
                           "batches from", file=net)
    model = CaffeNet(graph)
    load_caffemodel(model, weights)
    model.to(device)
    model.eval()
    try:
        run_test_command(model, feed, iterations, log)
    finally:
        feed.close()


COMMANDS = [train_cmd, test_cmd]
