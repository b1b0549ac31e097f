"""Parse + upgrade + graph + shape inference time for ResNet-152 deploy (target: < 0.5 s).

usage: python bench/graph_speed.py [PROTOTXT]   (default: ../shared KaimingHe ResNet-152 deploy, else specs/)
Prints the median of several runs after a warm-up (imports excluded), and the cold first run.
"""
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = [os.path.join(os.path.dirname(REPO), "shared", "corpus", "kaiminghe-resnet", "prototxt",
                         "ResNet-152-deploy.prototxt"),
            os.path.join(REPO, "specs", "resnet152_deploy.prototxt")]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else next(p for p in DEFAULTS if os.path.exists(p))
    import logging

    logging.getLogger("resnetc").setLevel(logging.ERROR)  # the legacy input-field upgrade warns on every read
    t0 = time.perf_counter()
    from resnetc.graph import build_graph
    from resnetc.prototxt import read_net
    from resnetc.layers.registry import supported_types

    supported_types()
    t_import = time.perf_counter() - t0
    times = []
    for _ in range(7):
        t = time.perf_counter()
        g = build_graph(read_net(path), "TEST")
        times.append(time.perf_counter() - t)
    print(f"{os.path.basename(path)}: {len(g.layers)} layers; imports {t_import:.3f} s; "
          f"parse+upgrade+graph+shapes: first {times[0]:.3f} s, median {statistics.median(times):.3f} s "
          f"(target < 0.5 s)")


if __name__ == "__main__":
    main()
