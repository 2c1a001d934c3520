"""An existing dask cluster over TLS, as a site runs one: ``dask scheduler`` and two
``dask worker`` processes (the dask CLIs, each in its own working folder) with certificates
made for the test; volnorm's CLI connects with dask's TLS config (environment variables).
One worker is killed with SIGKILL in the middle of the write: the output is still the same.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import volnorm as vn
from volnorm.engine import check_address
from volnorm.io.store import staging_path

from _clusters import store_chunks

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _certificates(d: Path) -> dict[str, Path]:
    """A CA and one certificate it signs for 127.0.0.1/localhost (scheduler, workers and client
    share it, as a site's cluster often does); PEM files in ``d``."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    days = datetime.timedelta(days=1)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("volnorm test CA")).issuer_name(name("volnorm test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - days).not_valid_after(now + days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("dask")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - days).not_valid_after(now + days)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def _tls_env(c: dict[str, Path]) -> dict[str, str]:
    """dask's TLS config for a client, as environment variables (what a site's users set)."""
    return {
        **os.environ,
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(c["ca"]),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(c["cert"]),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(c["key"]),
    }


class TLSCluster:
    """``dask scheduler`` and ``dask worker`` processes (no nanny: a killed worker stays dead)."""

    def __init__(self, root: Path, n_workers: int = 2) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.certs = _certificates(root)
        self.env = _tls_env(self.certs)
        tls = ["--tls-ca-file", str(self.certs["ca"]), "--tls-cert", str(self.certs["cert"]), "--tls-key", str(self.certs["key"])]
        sdir = root / "scheduler"
        sdir.mkdir()
        sfile = root / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self._start(sdir, [str(BIN / "dask"), "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                           "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sfile), *tls])
        deadline = time.monotonic() + 60
        while not sfile.exists():
            self._check_alive(deadline)
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written whole, but give its writer a moment
        self.address = json.loads(sfile.read_text())["address"]
        self.workers: list[subprocess.Popen] = []
        for i in range(n_workers):
            wdir = root / f"worker-{i}"
            wdir.mkdir()
            self.workers.append(self._start(wdir, [str(BIN / "dask"), "worker", self.address, "--no-nanny", "--nthreads", "1",
                                                   "--memory-limit", "1GiB", "--local-directory", str(wdir), "--host", "127.0.0.1",
                                                   "--name", f"w{i}", *tls]))
        from distributed import Client
        from distributed.security import Security

        sec = Security(tls_ca_file=str(self.certs["ca"]), tls_client_cert=str(self.certs["cert"]),
                       tls_client_key=str(self.certs["key"]), require_encryption=True)
        self.client = Client(self.address, security=sec, set_as_default=False, timeout=60)
        self.client.wait_for_workers(n_workers, timeout=120)

    def _start(self, cwd: Path, cmd: list[str]) -> subprocess.Popen:
        log = cwd / "log.txt"
        self.logs.append(log)
        p = subprocess.Popen(cmd, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(p)
        return p

    def _check_alive(self, deadline: float) -> None:
        for p, log in zip(self.procs, self.logs):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(p.args[:2])} did not start:\n{log.read_text()[-3000:]}")

    def close(self) -> None:
        self.client.close()
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture
def tls_cluster(tmp_path):
    c = TLSCluster(tmp_path / "cluster")
    try:
        yield c
    finally:
        c.close()


def _volnorm(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "volnorm"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_run_and_convert_on_an_external_tls_cluster_and_a_worker_killed_mid_write(tls_cluster, tmp_path):
    assert tls_cluster.address.startswith("tls://127.0.0.1:")
    data = tmp_path / "data"
    files = vn.datasets.make_cohort(data, n_subjects=30, shape=(96, 112, 96), seed=5)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "version: 1\n"
        f"input: {{nifti: '{data}/sub-*.nii'}}\n"
        "steps: [{rescale: {percentiles: [1, 99], out_range: uint16}}]\n"
        f"output: {{store: '{tmp_path}/out.zarr'}}\n"
        f"outputs: {{statistics: {{path: '{tmp_path}/stats.csv'}}}}\n"
    )
    # the reference: the same spec on this process's threads
    ref = tmp_path / "ref"
    ref.mkdir()
    spec_ref = ref / "spec.yaml"
    spec_ref.write_text(spec.read_text().replace(f"{tmp_path}/out.zarr", f"{ref}/out.zarr").replace(f"{tmp_path}/stats.csv", f"{ref}/stats.csv"))
    r = _volnorm(["run", str(spec_ref), "--scheduler", "threads", "--no-progress"], dict(os.environ), tmp_path)
    assert r.returncode == 0, r.stderr

    # volnorm run on the TLS cluster; one worker SIGKILLed once the first volumes are written
    proc = subprocess.Popen([str(BIN / "volnorm"), "run", str(spec), "--scheduler", tls_cluster.address, "--no-progress"],
                            env=tls_cluster.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = tls_cluster.workers[0]
    staging = staging_path(tmp_path / "out.zarr")
    deadline = time.monotonic() + 300
    killed_after = None
    while proc.poll() is None and time.monotonic() < deadline:
        written = [c for c in staging.glob("sub-*/*/c") if any(c.iterdir())] if staging.exists() else []
        if len(written) >= 2:
            os.kill(victim.pid, signal.SIGKILL)
            killed_after = len(written)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=600)
    assert killed_after is not None, f"the run ended before any volume was written: {err}"
    assert victim.wait(10) == -signal.SIGKILL
    assert proc.returncode == 0, err
    assert f"scheduler {tls_cluster.address}" in out + err
    assert len(tls_cluster.client.scheduler_info()["workers"]) == 1  # the other worker finished the run

    got, want = vn.open_zarr(tmp_path / "out.zarr"), vn.open_zarr(ref / "out.zarr")
    assert got.sizes["volume"] == len(files)
    np.testing.assert_array_equal(got.values, want.values)
    assert store_chunks(tmp_path / "out.zarr") == store_chunks(ref / "out.zarr")
    # the same statistics rows (the first line is a digest of the spec, whose paths differ)
    assert (tmp_path / "stats.csv").read_text().splitlines()[1:] == (ref / "stats.csv").read_text().splitlines()[1:]

    # volnorm convert on the same cluster (one worker left)
    r = _volnorm(["convert", str(data), str(tmp_path / "conv.zarr"), "--scheduler", tls_cluster.address, "--no-progress"],
                 tls_cluster.env, tmp_path)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(vn.open_zarr(tmp_path / "conv.zarr").values, vn.open_nifti(files).values)


def test_a_plain_tcp_address_of_another_machine_is_refused_before_connecting():
    """The rule, not a connection elsewhere: tcp:// to a non-loopback address is refused
    (before any socket is opened); tls:// and loopback are accepted; --allow-insecure opts in."""
    for address in ("tcp://192.0.2.10:8786", "tcp://10.1.2.3:8786", "tcp://[2001:db8::1]:8786", "tcp://scheduler.example.org:8786"):
        with pytest.raises(ValueError, match="not encrypted; use tls://"):
            check_address(address)
        check_address(address, allow_insecure=True)
    for address in ("tls://192.0.2.10:8786", "tcp://127.0.0.1:8786", "tcp://localhost:8786", "tcp://[::1]:8786"):
        check_address(address)
    r = subprocess.run([str(BIN / "volnorm"), "convert", "in", "out.zarr", "--scheduler", "tcp://192.0.2.10:8786"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not encrypted" in r.stderr, r.stderr
