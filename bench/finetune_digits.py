"""Fine-tuning on the shipped UCI digits: pretrain on digits 0-4, fine-tune on the held-out digits 5-9.

Everything goes through the command line, as a user would run it::

    resnetc data digits --classes 0-4 --relabel d04          # and 5-9 -> d59 (labels 0..4 in both)
    resnetc spec resnet --cifar --depth 20 --num-classes 5 --data lmdb:d04/...  -o base/r20.prototxt
    resnetc train base/r20_solver.prototxt                   # pretrain on 0-4
    resnetc finetune base/r20.prototxt --weights base/r20_iter_P.caffemodel --num-classes 5 \\
        --data lmdb:d59/digits_train_lmdb,d59/digits_test_lmdb [--freeze-until res2c] -o ft
    resnetc train ft/solver.prototxt                         # fine-tune on 5-9
    resnetc train scratch/r20_solver.prototxt                # the same net from scratch on 5-9, same iterations

The spec's CIFAR transform (3 mean values, mirroring) is replaced by the digits' own (the 0-4 mean file, scale 1/64,
no mirroring: a mirrored 2 is not a 2) and its solver by a short one (pretraining: lr 0.1, a tenth for the last
quarter). Fine-tuning uses `resnetc finetune`'s recipe with base_lr 0.01 (classifier x10) and a fixed rate; the
scratch runs train the same net on the same data with the same batch, seed, rate policy and iterations, at the
fine-tuning base_lr and at the papers' CIFAR rate 0.1. Each run tests every --test-every iterations on the 178 test
images of 5-9 (one pass, no image counted twice); the table gives the accuracy at each of those budgets. Last,
the layers ``--freeze-until`` froze are compared with the pretrained ones, byte for byte.

The runs on 5-9 use seed --seed + 1, not the pretraining's --seed: with the same seed the new classifier would be
filled with exactly the initial weights the pretrained classifier started from (the fillers draw in the same order),
a head the pretrained features were shaped to fit, which is not a fresh classifier.

    .venv/bin/python bench/finetune_digits.py [--pretrain-iters 400] [--iters 100] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from resnetc.prototxt import read_net, read_solver, to_text
from resnetc.weights import read_caffemodel

TEST_RE = re.compile(r"Iteration (\d+), Testing net \(#0\)|Test net output #\d+: accuracy = ([0-9.eE+-]+)")


def resnetc(*args, cwd) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "resnetc")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "resnetc"]
    r = subprocess.run(cmd + [str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"resnetc {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return r.stderr


def accuracies(log: str) -> dict:
    """{iteration: test accuracy} from a training log."""
    out, it = {}, None
    for m in TEST_RE.finditer(log):
        if m.group(1) is not None:
            it = int(m.group(1))
        elif it is not None:
            out[it] = float(m.group(2))
    if not out:
        sys.exit("no test accuracy in the log")
    return out


def divisor_batch(n: int, limit: int = 100) -> int:
    """The largest batch <= limit dividing n, so one test pass sees every image exactly once."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def count(path: str) -> int:
    from resnetc.data.db import DBReader

    with DBReader(path) as db:
        return len(db)


def digits_spec(work, name, data_dir, args, lr, iters, test_every, seed, pretrain=False):
    """`resnetc spec resnet` for the digits: the digits' transform, batch sizes and a short solver."""
    net = f"{name}/r{args.depth}.prototxt"
    resnetc("spec", "resnet", "--cifar", "--depth", args.depth, "--num-classes", 5, "--data",
            f"lmdb:{data_dir}/digits_train_lmdb,{data_dir}/digits_test_lmdb", "-o", net, cwd=work)
    src = read_net(os.path.join(work, net)).param
    n_test = count(os.path.join(work, data_dir, "digits_test_lmdb"))
    for lp in src.layer:
        if lp.type == "Data":
            tp = lp.transform_param
            tp.Clear()
            tp.mean_file = "d04/mean.binaryproto"  # the pretrained net's preprocessing, for every run
            tp.scale = 1 / 64
            train = lp.include[0].phase == 0
            lp.data_param.batch_size = args.batch if train else divisor_batch(n_test)
    with open(os.path.join(work, net), "w") as f:
        f.write(to_text(src))
    solver = f"{name}/r{args.depth}_solver.prototxt"
    s = read_solver(os.path.join(work, solver))
    s.test_iter[:] = [n_test // divisor_batch(n_test)]
    s.test_interval = test_every
    s.test_initialization = False
    s.base_lr = lr
    s.ClearField("stepvalue")
    if pretrain:
        s.lr_policy = "step"
        s.stepsize = max(1, iters * 3 // 4)
    else:
        s.lr_policy = "fixed"
    s.max_iter = iters
    s.display = 0
    s.average_loss = 1
    s.snapshot = 0
    s.ClearField("solver_mode")
    s.random_seed = seed
    with open(os.path.join(work, solver), "w") as f:
        f.write(to_text(s))
    return net, solver


def compare_layers(base_model: str, tuned_model: str, frozen: list) -> tuple:
    """(frozen layers byte-identical, other pretrained layers that changed)."""
    a = {l.name: l for l in read_caffemodel(base_model).layers if l.blobs}
    b = {l.name: l for l in read_caffemodel(tuned_model).layers if l.blobs}

    def same(n):
        pairs = list(zip(a[n].blobs, b[n].blobs))
        return len(a[n].blobs) == len(b[n].blobs) and all(
            x.data.dtype == y.data.dtype and x.data.tobytes() == y.data.tobytes() for x, y in pairs)

    return [n for n in frozen if same(n)], [n for n in b if n in a and n not in frozen and not same(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--size", type=int, default=8, help="image side (the digits are 8x8)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pretrain-iters", type=int, default=400)
    ap.add_argument("--iters", type=int, default=100, help="iterations of each run on 5-9")
    ap.add_argument("--test-every", type=int, default=25, help="test (and report) every N iterations")
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tuning base_lr (classifier x10)")
    ap.add_argument("--freeze-until", default="res2c")
    ap.add_argument("--seed", type=int, default=1, help="pretraining seed; the runs on 5-9 use seed + 1")
    ap.add_argument("--keep", help="work in this directory and keep it")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="finetune_digits.")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    for classes, d in (("0-4", "d04"), ("5-9", "d59")):
        resnetc("data", "digits", "--classes", classes, "--relabel", "--size", args.size, d, cwd=work)

    # 1. pretrain on 0-4
    net, solver = digits_spec(work, "base", "d04", args, 0.1, args.pretrain_iters, args.pretrain_iters, args.seed,
                              pretrain=True)
    acc_base = accuracies(resnetc("train", solver, cwd=work))[args.pretrain_iters]
    base_model = f"base/r{args.depth}_iter_{args.pretrain_iters}.caffemodel"
    print(f"pretrained on 0-4: {args.pretrain_iters} iterations, test accuracy {acc_base:.4f}  "
          f"({time.time() - t0:.0f} s)", flush=True)

    # 2. fine-tune on 5-9: all layers, and early layers frozen
    seed = args.seed + 1
    n_test = count(os.path.join(work, "d59", "digits_test_lmdb"))
    common = ["--weights", base_model, "--num-classes", 5, "--data", "lmdb:d59/digits_train_lmdb,d59/digits_test_lmdb",
              "--base-lr", args.lr, "--lr-policy", "fixed", "--max-iter", args.iters, "--test-interval",
              args.test_every, "--test-batch-size", divisor_batch(n_test), "--snapshot", 0, "--display", 0,
              "--seed", seed]
    runs = []
    frozen_report = None
    for label, out, extra in [("fine-tuned, all layers", "ft_all", []),
                              (f"fine-tuned, frozen to {args.freeze_until}", "ft_frozen",
                               ["--freeze-until", args.freeze_until])]:
        resnetc("finetune", net, *common, *extra, "-o", out, cwd=work)
        runs.append((label, accuracies(resnetc("train", f"{out}/solver.prototxt", cwd=work))))
        if extra:
            tv = read_net(os.path.join(work, out, "train_val.prototxt")).param
            frozen = [lp.name for lp in tv.layer if (lp.param and all(p.lr_mult == 0 for p in lp.param)) or
                      (lp.type == "BatchNorm" and lp.batch_norm_param.use_global_stats)]
            tuned = os.path.join(work, out, f"finetune_iter_{args.iters}.caffemodel")
            frozen_report = (frozen,) + compare_layers(os.path.join(work, base_model), tuned, frozen)
        print(f"{label}: {runs[-1][1][args.iters]:.4f}  ({time.time() - t0:.0f} s)", flush=True)

    # 3. the same net from scratch on 5-9, same iterations
    for lr in sorted({args.lr, 0.1}):
        _, solver = digits_spec(work, f"scratch_lr{lr:g}", "d59", args, lr, args.iters, args.test_every, seed)
        runs.append((f"from scratch, lr {lr:g}", accuracies(resnetc("train", solver, cwd=work))))
        print(f"from scratch, lr {lr:g}: {runs[-1][1][args.iters]:.4f}  ({time.time() - t0:.0f} s)", flush=True)

    budgets = list(range(args.test_every, args.iters + 1, args.test_every))
    print()
    print(f"ResNet-{args.depth} (CIFAR), digits {args.size}x{args.size}, batch {args.batch}: pretrained "
          f"{args.pretrain_iters} iterations on 0-4 ({acc_base:.4f}); test accuracy on 5-9 ({n_test} images) after")
    print(f"  {'iterations':<34}" + "".join(f"{b:>8}" for b in budgets))
    for label, acc in runs:
        print(f"  {label:<34}" + "".join(f"{acc.get(b, float('nan')):>8.4f}" for b in budgets))
    best_ft = max(acc[args.iters] for label, acc in runs if label.startswith("fine"))
    best_scratch = max(acc[args.iters] for label, acc in runs if label.startswith("from scratch"))
    verdict = "beats" if best_ft > best_scratch else "does not beat"
    print(f"after {args.iters} iterations the best fine-tuned run ({best_ft:.4f}) {verdict} the best from-scratch "
          f"run ({best_scratch:.4f})")
    frozen, same, changed = frozen_report
    print(f"frozen layers byte-identical after fine-tuning: {len(same)}/{len(frozen)} ({frozen[0]} ... {frozen[-1]}); "
          f"other pretrained layers changed: {len(changed)}")
    print(f"total {time.time() - t0:.0f} s" + (f"; files in {work}" if args.keep else ""))
    if len(same) != len(frozen):
        sys.exit("FAIL: a frozen layer changed")


if __name__ == "__main__":
    main()
