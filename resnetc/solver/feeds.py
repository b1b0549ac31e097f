"""Batches for a net's data layers: one input pipeline per data layer (``resnetc.data.pipeline``), merged
into the keyword inputs of ``net(...)`` and moved to the net's device. Each feed keeps its own cursor for
the whole run (Caffe's test nets keep reading where the previous test pass stopped, wrapping around)."""
from __future__ import annotations

from ..errors import ResnetcError


class NetFeed:
    """Callable giving the next ``{top: tensor}`` for all data layers of a graph."""

    def __init__(self, pipelines: dict, device=None):
        self.pipelines = pipelines
        self.device = device

    def __call__(self) -> dict:
        batch = {}
        for p in self.pipelines.values():
            batch.update(p.next_batch())
        if self.device is not None and self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def top_shapes(self) -> dict:
        """{top: shape} as far as the pipelines know them before the first batch."""
        shapes = {}
        for p in self.pipelines.values():
            tops = list(getattr(p, "tops", []))
            known = getattr(p, "top_shapes", None)
            if isinstance(known, dict):
                shapes.update(known)
                continue
            if tops and getattr(p, "shape", None) is not None:
                shapes[tops[0]] = tuple(p.shape)
            if len(tops) > 1 and getattr(p, "batch_size", None):
                shapes[tops[1]] = (int(p.batch_size),)
        return shapes

    def close(self) -> None:
        for p in self.pipelines.values():
            close = getattr(p, "close", None)
            if close:
                close()


def pipeline_feed(graph, *, seed=None, device=None, workers: int = 2) -> NetFeed:
    """The default feed: ``resnetc.data.pipeline.make_pipelines`` for the graph's data layers."""
    if not graph.data_tops:
        return NetFeed({}, device)
    try:
        from ..data.pipeline import make_pipelines
    except ImportError as e:  # pragma: no cover - the data package is part of resnetc
        raise ResnetcError(f"data layers need resnetc.data.pipeline ({e})", file=graph.file) from None
    return NetFeed(make_pipelines(graph, seed=seed, workers=workers), device)
