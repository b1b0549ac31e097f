"""Cost of the lowered CaffeNet vs the same ResNet-50 written by hand in PyTorch (same shapes, same weights),
measured side by side in one run: forward (TEST) and forward+backward, eager; then torch.compile and
channels_last. Prints time ratios resnetc / hand-written (target <= 1.03).

usage: python bench/overhead.py [--batch 8] [--reps 5] [--no-compile]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import handwritten  # noqa: E402
import resnetc  # noqa: E402


def timeit(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def side_by_side(a, b, reps, rounds=3):
    """Alternate a and b so drift of the machine hits both; return medians."""
    ta, tb = [], []
    for _ in range(rounds):
        ta += timeit(a, reps)
        tb += timeit(b, reps)
    return statistics.median(ta), statistics.median(tb)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = os.path.join(REPO, "specs", "resnet50_deploy.prototxt")
    net = resnetc.load_net(spec, phase="TEST", input_shapes={"data": (args.batch, 3, 224, 224)})
    hand = handwritten.resnet50_caffe()
    # random but sane BN statistics so activations stay finite
    with torch.no_grad():
        for name, blobs in net.params.items():
            if net.graph.layer(name).type == "BatchNorm":
                blobs[1].uniform_(0.5, 1.5)
                blobs[2].fill_(1.0)
            elif net.graph.layer(name).type in ("Convolution", "InnerProduct"):
                torch.nn.init.kaiming_normal_(blobs[0])
    handwritten.copy_from_caffenet(hand, net)
    hand.eval()
    x = torch.randn(args.batch, 3, 224, 224)
    out_name = net.outputs[0]
    with torch.no_grad():
        a = net(data=x)[out_name]
        b = torch.softmax(hand(x), 1) if "prob" in out_name else hand(x)
    print(f"ResNet-50 batch {args.batch}: max |resnetc - hand-written| = {float((a - b).abs().max()):.2e}")

    def fwd_r():
        with torch.no_grad():
            net(data=x)

    def fwd_h():
        with torch.no_grad():
            hand(x)

    def fb_r():
        out = net(data=x)[out_name]
        out.sum().backward()

    def fb_h():
        out = hand(x)
        (torch.softmax(out, 1) if "prob" in out_name else out).sum().backward()

    xr = x.clone().requires_grad_(True)
    r, h = side_by_side(fwd_r, fwd_h, args.reps)
    print(f"eager forward:          resnetc {r * 1000:8.1f} ms  hand-written {h * 1000:8.1f} ms  ratio {r / h:.3f}")
    r, h = side_by_side(fb_r, fb_h, args.reps)
    print(f"eager forward+backward: resnetc {r * 1000:8.1f} ms  hand-written {h * 1000:8.1f} ms  ratio {r / h:.3f}")
    net_cl = net.to(memory_format=torch.channels_last)
    hand_cl = hand.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def fwd_rc():
        with torch.no_grad():
            net_cl(data=x_cl)

    def fwd_hc():
        with torch.no_grad():
            hand_cl(x_cl)

    r, h = side_by_side(fwd_rc, fwd_hc, args.reps)
    print(f"channels_last forward:  resnetc {r * 1000:8.1f} ms  hand-written {h * 1000:8.1f} ms  ratio {r / h:.3f}")
    if not args.no_compile:
        cr = torch.compile(net)
        ch = torch.compile(hand)

        def fwd_rcomp():
            with torch.no_grad():
                cr(data=x)

        def fwd_hcomp():
            with torch.no_grad():
                ch(x)

        r, h = side_by_side(fwd_rcomp, fwd_hcomp, args.reps, rounds=2)
        print(f"compiled forward:       resnetc {r * 1000:8.1f} ms  hand-written {h * 1000:8.1f} ms  ratio {r / h:.3f}")


if __name__ == "__main__":
    main()
