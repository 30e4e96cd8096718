"""What the benchmarks' Python peers share: timing, peak RSS, torch.compile with its failure kept, and the
request loop of a peer that a C benchmark keeps running (bench_common.h: peer_start, peer_ask), so that
mmbridge and the peer can take turns repetition by repetition (A/B interleaved) without paying the peer's
start-up, export or compilation more than once."""
import json
import os
import resource
import statistics
import sys
import time


def rss_mib():
    """Peak resident set of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def times(fn, reps, warm=0):
    """warm untimed calls, then the seconds of each of reps calls."""
    for _ in range(warm):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def timeit(fn, reps):
    """(median, min) seconds of reps calls after one warm-up."""
    ts = times(fn, reps, warm=1)
    return statistics.median(ts), min(ts)


def reason(e):
    """An exception as one short line, for an n/a cell."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:300]


class Compiled:
    """torch.compile(fn, dynamic=False), compiled on first call. A failure (no C++ compiler, an
    unsupported op) is kept and raised again at once on later calls instead of recompiling."""

    def __init__(self, fn):
        import torch
        import torch._dynamo.config as dc
        dc.recompile_limit = max(dc.recompile_limit, 64)  # one graph per shape
        self.fn, self.failed = torch.compile(fn, dynamic=False), None

    def __call__(self, *args):
        if self.failed:
            raise RuntimeError("torch.compile failed: " + self.failed)
        try:
            return self.fn(*args)
        except Exception as e:  # noqa: BLE001 - any failure makes the cell n/a with its reason
            self.failed = reason(e)
            raise RuntimeError("torch.compile failed: " + self.failed) from None


def ort_session(path, threads):
    """An onnxruntime CPU session on threads intra-op threads and one inter-op thread, with every graph
    optimization (ORT_ENABLE_ALL, the default level, stated so that it is visible here)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def serve(hello, handlers):
    """Answers request lines `verb arg...` on stdin, one JSON line each on stdout: handlers[verb](*args)
    returns a dict; an exception answers {"error": ...}. hello (a dict) is the first line. Anything else
    written to stdout (libraries, compilers) is sent to stderr so that it cannot break the protocol."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply(hello)
    for line in sys.stdin:
        w = line.split()
        if not w:
            continue
        try:
            r = handlers[w[0]](*w[1:])
        except Exception as e:  # noqa: BLE001 - reported to the benchmark, which prints n/a
            r = {"error": reason(e)}
        reply(r)


def serve_setup(setup):
    """serve(*setup()); if setup raises, its reason is the first line (the benchmark prints the peer as
    n/a with it) and no request is answered."""
    try:
        hello, handlers = setup()
    except Exception as e:  # noqa: BLE001
        hello, handlers = {"error": reason(e)}, {}
    serve(hello, handlers)
