"""The one-machine dist_sync launcher: a job runs to the end on loopback; a crashed worker
stops the whole job with a clear message and leaves no process behind."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from quant_ops.errors import QuantOpsError
from quant_ops.train.distributed import launch_local

from qat_worker import tiny

WORKER = """
import sys, mxnet as mx
from mxnet import gluon, autograd
kv = mx.kv.create('dist_sync')
net = gluon.nn.Dense(3, in_units=4)
net.initialize(mx.init.Constant(0.1))
trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.1}, kvstore=kv,
                        update_on_kvstore=False)
if kv.rank == int(sys.argv[2]):
    import os
    os._exit(3)  # this worker crashes (a Python exit would wait for the others in kvstore)
for _ in range(3):
    with autograd.record():
        loss = net(mx.nd.ones((2, 4)) * (kv.rank + 1)).sum()
    loss.backward()
    trainer.step(4)
open(sys.argv[1] + '/w%d.txt' % kv.rank, 'w').write(str(net.weight.data().asnumpy().tolist()))
"""


def _processes_with(token: str) -> list:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if token.encode() in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:
                continue
    return found


def test_job_runs_to_the_end(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    token = uuid.uuid4().hex
    launch_local([sys.executable, str(script), str(tmp_path), "-1"], num_workers=2,
                 timeout=120, log_dir=tmp_path / "logs", env={"QO_TEST_TOKEN": token})
    assert (tmp_path / "w0.txt").is_file() and (tmp_path / "w1.txt").is_file()
    assert not _processes_with(token)


def test_failed_worker_stops_the_job(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    token = uuid.uuid4().hex
    with pytest.raises(QuantOpsError, match=r"worker\d exited with code 3; the job was stopped"):
        launch_local([sys.executable, str(script), str(tmp_path), "1"], num_workers=2,
                     timeout=60, log_dir=tmp_path / "logs", env={"QO_TEST_TOKEN": token})
    assert not _processes_with(token)  # scheduler, server and the other worker are gone


ROOT = Path(__file__).resolve().parents[1]


def _entry(out, *extra):
    return [sys.executable, str(ROOT / "tests" / "qat_worker.py"), "--model", "tiny",
            "--epochs", "1", "--train-limit", "1024", "--test-limit", "1000", "--lr", "0.05",
            "--out", str(out), *extra]


def test_two_workers_end_with_identical_model_and_ranges(tmp_path):
    import json

    import mxnet as mx
    import numpy as np

    token = uuid.uuid4().hex
    launch_local(_entry(tmp_path / "dist", "--kvstore", "dist_sync", "--batch-size", "32"),
                 num_workers=2, timeout=240, log_dir=tmp_path / "logs",
                 env={"QO_TEST_TOKEN": token})
    assert not _processes_with(token)
    a = mx.nd.load(str(tmp_path / "dist" / "rank0" / "final-0000.params"))
    b = mx.nd.load(str(tmp_path / "dist" / "rank1" / "final-0000.params"))
    assert a.keys() == b.keys() and any(k.endswith("_minmax") for k in a)
    for k in a:  # weights and quantizer state alike
        assert np.array_equal(a[k].asnumpy(), b[k].asnumpy()), k
    dist = json.loads((tmp_path / "dist" / "rank0" / "result.json").read_text())
    import subprocess

    r = subprocess.run(_entry(tmp_path / "single", "--kvstore", "device", "--batch-size", "64"),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    single = json.loads((tmp_path / "single" / "rank0" / "result.json").read_text())
    assert dist["steps"] == single["steps"] == 16          # same global batch, same steps
    assert abs(dist["accuracy"] - single["accuracy"]) < 5  # within the noise of 16 steps


def test_killed_worker_ends_the_job_and_keeps_the_checkpoint(tmp_path):
    import json

    token = uuid.uuid4().hex
    with pytest.raises(QuantOpsError, match=r"worker\d exited with code -9"):
        launch_local(_entry(tmp_path, "--kvstore", "dist_sync", "--batch-size", "32",
                            "--checkpoint-every", "4", "--fail-at-step", "10"),
                     num_workers=2, timeout=240, log_dir=tmp_path / "logs",
                     env={"QO_TEST_TOKEN": token})
    assert not _processes_with(token)
    for rank in (0, 1):  # the last complete checkpoint of each worker is intact
        ck = tmp_path / "checkpoint" / f"rank{rank}"
        progress = json.loads((ck / "progress.json").read_text())
        assert progress["step"] == 8
        net = tiny()[0]
        from quant_ops.prepare import quantize_block

        quantize_block(net, "trt_int8").load_parameters(str(ck / "net.params"))


SLEEPER = """
import time, mxnet as mx
kv = mx.kv.create('dist_sync')
time.sleep(120)
"""


def _listening(pids: list) -> set:
    """Local addresses (hex ip) of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    addrs = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:
                addrs.add(f[1].split(":")[0])
    return addrs


@pytest.mark.parametrize("module", ["quant_ops.cli.launch", "quant_ops.train.launch"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_signal_to_the_launcher_ends_the_whole_job_on_loopback(sig, module, tmp_path):
    import signal
    import subprocess
    import time

    script = tmp_path / "w.py"
    script.write_text(SLEEPER)
    token = uuid.uuid4().hex
    root = Path(__file__).resolve().parents[1]
    launcher = subprocess.Popen(
        [sys.executable, "-m", module, "-n", "2", "-s", "1", "--timeout",
         "300", "--", sys.executable, str(script)], cwd=root, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "QO_TEST_TOKEN": token})
    deadline = time.time() + 60
    while len(_processes_with(token)) < 5 and time.time() < deadline:
        time.sleep(0.2)
    children = [p for p in _processes_with(token) if p != launcher.pid]
    assert len(children) == 4
    # the nodes connect and listen: poll, since a loaded machine starts them slowly
    listening = _listening(children)
    while not listening and time.time() < deadline + 60:
        time.sleep(0.5)
        listening = _listening(children)
    time.sleep(2)   # the rest of the nodes open theirs
    listening = _listening(children)
    assert listening and listening <= {"0100007F", "00000000000000000000000001000000"}
    launcher.send_signal(getattr(signal, sig))
    code = launcher.wait(30)
    deadline = time.time() + 15
    while _processes_with(token) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_with(token)
    if sig != "SIGKILL":
        assert code == 1 and "stopped by signal" in launcher.stderr.read()
