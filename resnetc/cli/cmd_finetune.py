"""``resnetc finetune``: a pretrained net → a fine-tuning train_val + solver + deploy (resnetc.finetune)."""
from __future__ import annotations

import logging

import click

from ..errors import ResnetcError

log = logging.getLogger("resnetc.finetune")


def _data(value):
    if value is None:
        return None
    from .cmd_spec import parse_data

    src = parse_data(value)
    return (src.train, src.test)


@click.command("finetune")
@click.argument("base", metavar="BASE", type=click.Path(dir_okay=False))
@click.option("--weights", required=True, metavar="FILE", help="The pretrained weights (.caffemodel, .h5, ...).")
@click.option("--num-classes", type=int, required=True, help="Outputs of the new classifier.")
@click.option("--data", metavar="lmdb:TRAIN[,TEST]", help="The new data set's LMDBs (required for a deploy BASE; "
              "a train_val BASE keeps its data layers without it).")
@click.option("--freeze-until", metavar="LAYER", help="lr_mult 0 (and stored BatchNorm statistics) for every layer "
              "up to and including LAYER, in file order.")
@click.option("--lr-mult-backbone", type=float, default=1.0, show_default=True,
              help="Multiply the lr_mult of the other pretrained layers.")
@click.option("--lr-mult-head", type=float, default=10.0, show_default=True,
              help="lr_mult of the new classifier's weights (its bias gets twice this; Caffe's example: 10/20).")
@click.option("--classifier-name", metavar="NAME", help="Name of the new classifier (default: the old one + _ft).")
@click.option("--mean-file", help="transform_param.mean_file of the Data layers.")
@click.option("--mean-value", "mean_value", type=float, multiple=True, help="transform_param.mean_value "
              "(repeatable, one per channel).")
@click.option("--scale", type=float, help="transform_param.scale.")
@click.option("--crop-size", type=click.IntRange(min=1), help="transform_param.crop_size (default for a deploy "
              "BASE: its input size when the LMDB's images are larger).")
@click.option("--mirror/--no-mirror", default=None, help="Random mirroring of the TRAIN images.")
@click.option("--batch-size", type=click.IntRange(min=1), help="TRAIN batch (default: BASE's, else 32).")
@click.option("--test-batch-size", type=click.IntRange(min=1), help="TEST batch (default: BASE's, else 50).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="BLOB=N,C,H,W",
              help="Shape of a data top when its LMDB is not there yet (for the deploy net).")
# solver
@click.option("--base-lr", type=float, default=0.001, show_default=True)
@click.option("--lr-policy", default="step", show_default=True)
@click.option("--stepsize", type=int, default=20000, show_default=True)
@click.option("--gamma", type=float, default=0.1, show_default=True)
@click.option("--max-iter", type=click.IntRange(min=0), default=100000, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=0.0005, show_default=True)
@click.option("--solver-type", "solver_type", default="SGD", show_default=True, help="SGD, Nesterov, Adam, ...")
@click.option("--display", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--test-interval", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--test-iter", type=click.IntRange(min=1), help="Test batches per test (default: one pass over the "
              "test LMDB).")
@click.option("--snapshot", type=click.IntRange(min=0), default=10000, show_default=True)
@click.option("--seed", type=int, help="Solver random_seed. Not the pretraining's: the same seed fills the new "
              "classifier with exactly the initial weights of the one it replaces.")
@click.option("--early-stop", metavar="OUTPUT:PATIENCE[:max|min]", help="Stop when this TEST output has not "
              "improved for PATIENCE tests (solver extension resnetc.early_stop_*).")
@click.option("-o", "--output", "out_dir", required=True, metavar="DIR",
              help="Writes DIR/train_val.prototxt, DIR/solver.prototxt, DIR/deploy.prototxt.")
def finetune_cmd(base, weights, num_classes, data, freeze_until, lr_mult_backbone, lr_mult_head, classifier_name,
                 mean_file, mean_value, scale, crop_size, mirror, batch_size, test_batch_size, input_shapes, base_lr,
                 lr_policy, stepsize, gamma, max_iter, momentum, weight_decay, solver_type, display, test_interval,
                 test_iter, snapshot, seed, early_stop, out_dir):
    """Fine-tune BASE (train_val or deploy) from --weights on a new set of classes.

    \b
    Writes DIR/train_val.prototxt (the classifier renamed NAME_ft with --num-classes outputs and lr_mult
    10/20, frozen or slower layers as asked), DIR/solver.prototxt (weights: --weights) and DIR/deploy.prototxt;
    then run:  resnetc train DIR/solver.prototxt   (from this directory: paths are kept as given)
    """
    from ..finetune import FinetuneOptions, SolverOptions, Transform, finetune
    from .cmd_inspect import parse_input_shapes

    if num_classes < 1:
        raise ResnetcError(f"--num-classes must be >= 1 (got {num_classes})")
    opts = FinetuneOptions(
        num_classes=num_classes, weights=weights, data=_data(data), freeze_until=freeze_until,
        lr_mult_backbone=lr_mult_backbone, lr_mult_head=lr_mult_head, classifier_name=classifier_name,
        transform=Transform(mean_file=mean_file, mean_value=tuple(mean_value), scale=scale, crop_size=crop_size,
                            mirror=mirror),
        batch_size=batch_size, test_batch_size=test_batch_size, input_shapes=parse_input_shapes(input_shapes),
        solver=SolverOptions(base_lr=base_lr, lr_policy=lr_policy, gamma=gamma, stepsize=stepsize, max_iter=max_iter,
                             momentum=momentum, weight_decay=weight_decay, display=display,
                             test_interval=test_interval, test_iter=test_iter, snapshot=snapshot, seed=seed,
                             type=solver_type, early_stop=early_stop))
    plan = finetune(base, opts, out_dir)
    for path in plan.paths.values():
        click.echo(path)
    log.info("next: resnetc train %s", plan.paths["solver"])


COMMANDS = [finetune_cmd]
