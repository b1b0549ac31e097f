"""Read training logs — real Caffe's glog output and resnetc's, which use the same lines — into the train and
test tables Caffe's ``tools/extra/parse_log.py`` wrote (``NumIters,Seconds,LearningRate,<outputs>``)."""
from __future__ import annotations

import csv
import dataclasses
import datetime
import gzip
import io
import re

from .atomic import write_text
from .errors import ResnetcError

_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|-?inf))"
RE_ITER = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = " + _NUM)
RE_ITER_ANY = re.compile(r"Iteration (\d+)")
RE_LR = re.compile(r"Iteration (\d+), lr = " + _NUM)
RE_TRAIN_OUT = re.compile(r"Train net output #(\d+): (\S+) = " + _NUM)
RE_TESTING = re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)")
RE_TEST_OUT = re.compile(r"Test net output #(\d+): (\S+) = " + _NUM)
# glog prefix: I1124 18:20:38.553125 (year-less) or I20261124 18:20:38.553125
RE_TIME = re.compile(r"^[IWEF](\d{4}|\d{8}) (\d\d):(\d\d):(\d\d)\.(\d+)")


@dataclasses.dataclass
class LogTables:
    train_columns: list
    train: list  # rows: dicts
    test_columns: list
    test: list
    display_loss: list  # (iteration, displayed smoothed loss)
    source: str = ""

    def csv(self, which: str) -> str:
        cols = self.train_columns if which == "train" else self.test_columns
        rows = self.train if which == "train" else self.test
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in cols})
        return buf.getvalue()


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if v != int(v) or abs(v) > 1e15 else (str(int(v)) if v == int(v) else repr(v))
    return str(v)


def _seconds(line: str, state: dict):
    m = RE_TIME.match(line)
    if not m:
        return None
    date, hh, mm, ss, frac = m.groups()
    md = date[-4:]
    try:
        t = datetime.datetime(2000, int(md[:2]), int(md[2:]), int(hh), int(mm), int(ss), int(frac[:6].ljust(6, "0")))
    except ValueError:
        return None
    if "start" not in state:
        state["start"] = t
    delta = (t - state["start"]).total_seconds()
    if delta < 0:  # crossed a year boundary
        delta += 366 * 86400
    return delta


def read_log_text(path: str) -> str:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rt", errors="replace") as f:
                return f.read()
        with open(path, errors="replace") as f:
            return f.read()
    except OSError as e:
        raise ResnetcError(f"cannot read the log: {e.strerror or e}", file=path) from None


def parse_log(path: str) -> LogTables:
    """Train and test tables of a Caffe or resnetc training log."""
    text = read_log_text(path)
    state: dict = {}
    train, test, display = [], [], []
    train_cols, test_cols = ["NumIters", "Seconds", "LearningRate"], ["NumIters", "Seconds", "LearningRate"]
    iteration = None
    lr = None
    train_row = None
    test_row = None
    last_seconds = None
    for line in text.splitlines():
        secs = _seconds(line, state)
        if secs is not None:
            last_seconds = secs
        m = RE_LR.search(line)
        if m:
            lr = float(m.group(2))
            if train_row is not None and int(m.group(1)) == train_row["NumIters"]:
                train_row["LearningRate"] = lr
            continue
        m = RE_TESTING.search(line)
        if m:
            test_row = {"NumIters": int(m.group(1)), "Seconds": last_seconds, "LearningRate": lr}
            test.append(test_row)
            continue
        m = RE_TEST_OUT.search(line)
        if m and test_row is not None:
            name = m.group(2)
            if name not in test_cols:
                test_cols.append(name)
            test_row[name] = float(m.group(3))
            continue
        m = RE_ITER.search(line)
        if m:
            iteration = int(m.group(1))
            display.append((iteration, float(m.group(2))))
            train_row = {"NumIters": iteration, "Seconds": last_seconds, "LearningRate": lr}
            train.append(train_row)
            continue
        m = RE_TRAIN_OUT.search(line)
        if m and train_row is not None:
            name = m.group(2)
            if name not in train_cols:
                train_cols.append(name)
            train_row[name] = float(m.group(3))
    if not train and not test:
        raise ResnetcError("no training iterations or test results found (is this a Caffe/resnetc training log?)",
                           file=path)
    # Caffe's parse_log keeps train rows that carry outputs; the lr of an iteration is logged after its loss
    for i, row in enumerate(train):
        if row.get("LearningRate") is None and i + 1 < len(train):
            row["LearningRate"] = lr
    return LogTables(train_cols, train, test_cols, test, display, path)


def write_csvs(tables: LogTables, prefix: str) -> tuple:
    train_path, test_path = prefix + ".train", prefix + ".test"
    write_text(train_path, tables.csv("train"))
    write_text(test_path, tables.csv("test"))
    return train_path, test_path


def plot_logs(logs: list, out: str) -> None:
    """Training loss, test outputs and learning rate against iterations, one line per log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ResnetcError("plotting needs matplotlib: pip install 'resnetc[plot]'") from None
    fig, axes = plt.subplots(3, 1, figsize=(8, 10), sharex=True)
    for t in logs:
        label = t.source.rsplit("/", 1)[-1]
        if t.display_loss:
            it, loss = zip(*t.display_loss)
            axes[0].plot(it, loss, label=f"{label}: loss")
        for col in t.test_columns[3:]:
            pts = [(r["NumIters"], r[col]) for r in t.test if col in r]
            if pts:
                it, v = zip(*pts)
                axes[1].plot(it, v, marker="o", label=f"{label}: {col}")
        pts = [(r["NumIters"], r["LearningRate"]) for r in t.train if r.get("LearningRate") is not None]
        if pts:
            it, v = zip(*pts)
            axes[2].plot(it, v, label=label)
    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel("test outputs")
    axes[2].set_ylabel("learning rate")
    axes[2].set_xlabel("iteration")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    from .atomic import atomic_path

    fmt = out.rsplit(".", 1)[-1].lower() if "." in out else "png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=100)
    plt.close(fig)
