"""Data-parallel training on MXNet's kvstore, with the state that is not a gradient kept
identical on every worker, and a launcher for one machine.

Gradients go through the kvstore as usual (summed over workers).  Quantizer state (EMA
ranges, step counters), BatchNorm statistics and any other parameter that is not trained by
gradients are *averaged* over the workers after every optimizer step, through the same
kvstore under their own keys, so every worker's checkpoint is the same model.

MXNet's bundled ``tools/launch.py`` fails on Python 3.11; ``launch_local`` starts the
scheduler, the servers and the workers as local processes on loopback with the ``DMLC_*``
variables, stops the whole job when any process fails or the timeout passes, and leaves no
process behind.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from ..errors import QuantOpsError

log = logging.getLogger(__name__)
STATE_KEY_BASE = 1 << 20   # the Trainer uses keys 0..n_params-1; state keys stay apart


class StateSync:
    """Average every non-gradient parameter of ``net`` over the workers of ``kv``."""

    def __init__(self, net, kv):
        self.kv = kv
        self.params = [p for _, p in sorted(net.collect_params().items())
                       if p.grad_req == "null"]
        self.keys = [STATE_KEY_BASE + i for i in range(len(self.params))]
        self._initialized = False

    def __call__(self) -> None:
        if not self.params or self.kv.num_workers == 1:
            return
        arrays = [p.data() for p in self.params]
        if not self._initialized:
            self.kv.init(self.keys, [a.zeros_like() for a in arrays])
            self._initialized = True
        self.kv.pushpull(self.keys, arrays, out=arrays)   # the sum over workers
        for a in arrays:
            a /= self.kv.num_workers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a child before exec: the kernel kills it when the launcher dies, however it dies
    (PR_SET_PDEATHSIG; Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class _Stop(BaseException):
    """SIGTERM / SIGINT reached the launcher: stop the job, then say so."""


@contextmanager
def _stop_on_signals():
    """Turn SIGTERM/SIGINT into an exception while the job runs, so that the launcher
    stops every process before it exits (Python's default SIGTERM exits at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise _Stop(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _kill_all(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 5
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def launch_local(command: Sequence[str], num_workers: int = 2, num_servers: int = 1,
                 timeout: float = 600, log_dir: str | Path | None = None,
                 env: dict | None = None, interface: str | None = None) -> None:
    """Run ``command`` as ``num_workers`` workers of a ``dist_sync`` job on this machine.

    Every process binds to loopback unless ``interface`` names another network interface.
    Raises QuantOpsError (naming the process and the end of its log) when a worker fails,
    the job outlives ``timeout`` seconds or the launcher gets SIGTERM/SIGINT; every process
    started is stopped either way, and dies with the launcher if it is killed outright.
    """
    if num_workers < 1 or num_servers < 1:
        raise QuantOpsError("a distributed job needs at least one worker and one server")
    # MXNet 1.9.1's dist kvstore mis-handles arrays that MKL-DNN has put in its own layout
    # (convolution weights after a forward): the server aborts with "init N first"
    base = {"MXNET_MKLDNN_ENABLED": "0", **os.environ, **(env or {}),
            "DMLC_PS_ROOT_URI": "127.0.0.1",
            # ps-lite binds each node to the address of this interface (default: the
            # machine's first non-loopback one)
            **({"DMLC_INTERFACE": interface} if interface else
               {"DMLC_INTERFACE": "lo", "DMLC_NODE_HOST": "127.0.0.1"}),
            "DMLC_PS_ROOT_PORT": str(free_port()), "DMLC_NUM_SERVER": str(num_servers),
            "DMLC_NUM_WORKER": str(num_workers), "PS_VERBOSE": "0"}
    log_dir = Path(log_dir) if log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    server_cmd = [sys.executable, "-c", "import mxnet"]  # importing mxnet runs the role
    roles = [("scheduler", "scheduler", server_cmd)] \
        + [(f"server{i}", "server", server_cmd) for i in range(num_servers)] \
        + [(f"worker{i}", "worker", list(command)) for i in range(num_workers)]
    procs, names, logs = [], [], []
    try:
        with _stop_on_signals():
            _run(roles, base, log_dir, procs, names, logs, timeout)
    except _Stop as e:
        raise QuantOpsError(f"stopped by signal {e.args[0]}: every process of the job was "
                            "stopped") from None
    finally:
        _kill_all(procs)


def _run(roles, base, log_dir, procs, names, logs, timeout) -> None:
    """Start the processes, then wait for the workers to finish or anything to fail."""
    for name, role, cmd in roles:
        path = log_dir / f"{name}.log" if log_dir else None
        with open(path, "w") if path else open(os.devnull, "w") as out:
            procs.append(subprocess.Popen(cmd, env={**base, "DMLC_ROLE": role},
                                          stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True,
                                          preexec_fn=_die_with_parent))
        names.append(name)
        logs.append(path)
    workers = [i for i, n in enumerate(names) if n.startswith("worker")]
    deadline = time.time() + timeout
    while True:
        codes = {i: procs[i].poll() for i in range(len(procs))}
        if all(codes[i] == 0 for i in workers):
            return
        # a scheduler or server that fails leaves the workers waiting: stop on any failure
        failed = [i for i, c in codes.items() if c not in (None, 0)]
        if failed:
            i = failed[0]
            tail = ""
            if logs[i] and logs[i].is_file():
                tail = " | ".join(logs[i].read_text().strip().splitlines()[-3:])
            raise QuantOpsError(f"{names[i]} exited with code {codes[i]}; the job was "
                                f"stopped{': ' + tail if tail else ''}")
        if time.time() > deadline:
            raise QuantOpsError(f"the distributed job did not finish within {timeout:.0f} s"
                                "; every process was stopped")
        time.sleep(0.2)
