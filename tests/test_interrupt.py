"""Ctrl-C stops a long Rust call promptly, and the next call is right.

A child process runs each long call, the test sends it SIGINT half a second in, and the child
must catch KeyboardInterrupt soon after, then repeat a short call whose result must equal the
same call made before the interrupt (bitwise: the kernels are deterministic, so stale
workspaces or a broken thread pool would show).
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

# Seconds from SIGINT to KeyboardInterrupt in the child: signals are polled every 50 ms and a
# kernel stops within one iteration; the rest is slack for a loaded machine.
PROMPT = 1.5
# Seconds after which a child that ignores SIGINT is killed, so that the test fails, not hangs.
WATCHDOG = 120

CHILD = r"""
import signal, sys, time, torch, mmot

# A child of a shell's background job starts with SIGINT ignored, and Python keeps it so.
signal.signal(signal.SIGINT, signal.default_int_handler)

# A case maps n_iters to its long part: the forward, or the backward of a forward done first.
def fwd(f, x, **kw):
    return lambda n: lambda: f(x, n_iters=n, backend="rust", **kw)

def bwd(f, x, **kw):
    def prepare(n):
        y = f(x.requires_grad_(), n_iters=n, backend="rust", **kw)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        return lambda: torch.autograd.grad(y, x, gy)[0]
    return prepare

def backward_iters(prepare, seconds):
    # Enough iterations that the backward takes `seconds` here (capped: it records them all).
    run = prepare(50); t = time.perf_counter(); run(); per_iter = (time.perf_counter() - t) / 50
    return int(min(max(seconds / per_iter, 200), 20000))

g = torch.Generator().manual_seed(0)
ms = lambda x, **kw: mmot.multi_sinkhorn(x, 4, eps=0.05, **kw)
sk = lambda x, **kw: mmot.sinkhorn(x, 0.05, **kw)
cases = {
    "sinkhorn": fwd(sk, torch.randn(64, 32, generator=g)),
    "sinkhorn_small_batch": fwd(sk, torch.randn(64, 8, 8, generator=g)),
    "sinkhorn_backward": bwd(sk, torch.randn(512, 512, generator=g)),
    "multi_sinkhorn": fwd(ms, torch.randn(64, 32, generator=g)),
    "multi_sinkhorn_small_batch": fwd(ms, torch.randn(64, 8, 16, generator=g)),
    "multi_sinkhorn_backward": bwd(ms, torch.randn(1024, 32, generator=g)),
}
for name in sys.argv[1:]:
    prepare = cases[name]
    before = prepare(5)()
    long_part = prepare(backward_iters(prepare, 4.0) if name.endswith("backward") else 10**9)
    print("ready", flush=True)
    try:
        long_part()
        print("finished", flush=True)
    except KeyboardInterrupt:
        print("caught", time.time(), flush=True)
    print("same" if torch.equal(prepare(5)(), before) else "differs", flush=True)
"""


def _line(proc):
    line = proc.stdout.readline().split()
    assert line, f"child ended or was killed after {WATCHDOG} s: {proc.stderr.read()}"
    return line


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child is POSIX-only")
def test_ctrl_c_stops_long_rust_calls_and_the_next_call_is_right():
    cases = [
        "sinkhorn",
        "sinkhorn_small_batch",
        "sinkhorn_backward",
        "multi_sinkhorn",
        "multi_sinkhorn_small_batch",
        "multi_sinkhorn_backward",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *cases], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ
    )
    watchdog = threading.Timer(WATCHDOG, proc.kill)
    watchdog.start()
    try:
        for case in cases:
            assert _line(proc) == ["ready"], case
            time.sleep(0.5)
            sent = time.time()
            proc.send_signal(signal.SIGINT)
            outcome = _line(proc)
            assert outcome[0] == "caught", f"{case}: {outcome}"
            assert float(outcome[1]) - sent < PROMPT, f"{case}: KeyboardInterrupt after {float(outcome[1]) - sent:.2f} s"
            assert _line(proc) == ["same"], case
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        watchdog.cancel()
        proc.kill()
