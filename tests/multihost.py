"""Runs a worker script as two jax.distributed processes on 127.0.0.1 (the project's stand-in
for two hosts), for the multi-host tests."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import xla_flags

REPO = Path(__file__).resolve().parents[1]

# Put before every worker body: joins the two processes and leaves `mesh` (every device of both),
# `args` (the extra arguments) and `out` (the .npy path this process writes) defined.
PREAMBLE = """
import sys
import jax
from ddpm_jax import parallel
port, process_id, *args, out = sys.argv[1:]
parallel.initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
mesh = parallel.make_mesh()
assert jax.process_count() == 2
"""


def run_on_two_hosts(code: str, tmp_path: Path, *extra_args: str, devices_per_host: int = 2,
                     timeout: float = 180) -> list[Path]:
    """Writes PREAMBLE + `code` to a file and runs it twice as
    `worker.py PORT PROCESS_ID *extra_args OUT`,
    each process with `devices_per_host` CPU devices. Fails the test with the worker's stderr
    if either exits non-zero; returns the two OUT paths (out0.npy, out1.npy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = tmp_path / "worker.py"
    worker.write_text(PREAMBLE + code)
    outs = [tmp_path / f"out{i}.npy" for i in range(2)]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(devices_per_host))
    procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), *extra_args, str(out)],
                              env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
             for i, out in enumerate(outs)]
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
    return outs
