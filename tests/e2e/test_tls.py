"""TLS against real RabbitMQ nodes with TLS listeners, started by the test suite (tests/support/nodes.py).

Certificates are made for the run: a CA, a server certificate for localhost/127.0.0.1, a client
certificate (CN=guest, so EXTERNAL logs in as guest), and an unrelated CA.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.parse

import pytest
from pamqp import commands

from magne.amqp.url import parse_url
from magne.engine.client import Client
from magne.errors import ConnectionClosed, TLSError
from support import ROOT, wait_for

pytestmark = pytest.mark.tls


def url(node, **query: str) -> str:
    return f"{node.tls_url}?{urllib.parse.urlencode(query)}" if query else node.tls_url


def connect(u: str) -> Client:
    return Client(parse_url(u), "magne tls test", timeout=15).open()


def test_trusted_ca_passes_and_publishes(tls_nodes):
    node, certs = tls_nodes["open"], tls_nodes["certs"]
    c = connect(url(node, cacertfile=str(certs.ca)))
    try:
        c.rpc(commands.Queue.Declare(queue="tls-q", auto_delete=True), commands.Queue.DeclareOk)
        c.publish_confirmed("", "tls-q", b'{"func":"x"}', commands.Basic.Properties())
        assert c.queue_counts("tls-q")[0] == 1
    finally:
        c.close()


def test_untrusted_ca_is_one_clear_permanent_error(tls_nodes):
    node = tls_nodes["open"]
    with pytest.raises(TLSError, match="not signed by a CA this client trusts") as e:
        connect(url(node))  # the system's CAs do not include the test CA
    assert e.value.permanent
    with pytest.raises(TLSError, match="not signed by a CA this client trusts"):
        connect(url(node, cacertfile=str(tls_nodes["certs"].other_ca)))


def test_wrong_host_name_fails(tls_nodes):
    node, certs = tls_nodes["open"], tls_nodes["certs"]
    with pytest.raises(TLSError, match="does not match the host name 'wrong.example'"):
        connect(url(node, cacertfile=str(certs.ca), server_name_indication="wrong.example"))


def test_expired_server_certificate_fails_clearly(tls_nodes):
    with pytest.raises(TLSError, match="has expired"):
        connect(url(tls_nodes["expired"], cacertfile=str(tls_nodes["certs"].ca)))


def test_verify_none_connects_to_an_untrusted_broker(tls_nodes):
    connect(url(tls_nodes["open"], verify="verify_none")).close()


def test_client_certificate_required_and_given_logs_in_with_external(tls_nodes):
    node, certs = tls_nodes["strict"], tls_nodes["certs"]
    with pytest.raises(TLSError, match="requires a client certificate"):
        connect(url(node, cacertfile=str(certs.ca)))
    c = connect(url(node, cacertfile=str(certs.ca), certfile=str(certs.client), keyfile=str(certs.client_key)))
    try:
        mechs = node.ctl("list_connections", "client_properties", "auth_mechanism")
        assert any("magne tls test" in line and "EXTERNAL" in line for line in mechs.splitlines()), mechs
    finally:
        c.close()


def test_client_certificate_from_an_unknown_ca_is_refused(tls_nodes):
    node, certs = tls_nodes["strict"], tls_nodes["certs"]
    with pytest.raises((TLSError, ConnectionClosed)):
        connect(url(node, cacertfile=str(certs.ca), certfile=str(certs.other_client), keyfile=str(certs.other_client_key)))


def test_plain_can_be_forced_with_a_client_certificate(tls_nodes):
    node, certs = tls_nodes["strict"], tls_nodes["certs"]
    c = connect(url(node, cacertfile=str(certs.ca), certfile=str(certs.client), keyfile=str(certs.client_key),
                    auth_mechanism="plain"))
    try:
        mechs = node.ctl("list_connections", "client_properties", "auth_mechanism")
        assert any("magne tls test" in line and "PLAIN" in line for line in mechs.splitlines()), mechs
    finally:
        c.close()


def test_worker_over_tls_runs_tasks_and_files_come_from_the_environment(tls_nodes, tmp_path):
    """A worker over amqps with the CA and client certificate in MAGNE_TLS_* variables (no secrets in argv)."""
    node, certs = tls_nodes["strict"], tls_nodes["certs"]
    (tmp_path / "tlstasks.py").write_text(
        "from magne import task\n@task(queue='tls-work')\ndef mark(path):\n    open(path, 'a').write('ran\\n')\n")
    env = {"MAGNE_URL": node.tls_url, "MAGNE_TLS_CACERTFILE": str(certs.ca), "MAGNE_TLS_CERTFILE": str(certs.client),
           "MAGNE_TLS_KEYFILE": str(certs.client_key), "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "magne", "worker", "tlstasks", "--threads", "2"], cwd=tmp_path,
                                env=env, stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: " ready: " in log_path.read_text() or proc.poll() is not None, 30, what="the TLS worker ready")
        assert proc.poll() is None, log_path.read_text()
        out = tmp_path / "ran.txt"
        c = connect(url(node, cacertfile=str(certs.ca), certfile=str(certs.client), keyfile=str(certs.client_key)))
        try:
            body = b'{"func": "mark", "args": [%s]}' % repr(str(out)).replace("'", '"').encode()
            c.publish_confirmed("", "tls-work", body, commands.Basic.Properties(delivery_mode=2))
        finally:
            c.close()
        wait_for(lambda: out.exists() and out.read_text() == "ran\n", 30, what="the task to run over TLS")
    finally:
        proc.terminate()
        proc.wait(30)
    log = log_path.read_text()
    assert proc.returncode == 0, log
    assert "amqps://guest@127.0.0.1:5693" in log and "guest:guest" not in log


def test_worker_with_an_untrusted_ca_exits_2_with_one_line(tls_nodes, tmp_path):
    node = tls_nodes["open"]
    (tmp_path / "tlstasks2.py").write_text("from magne import task\n@task\ndef nop():\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "magne", "worker", "tlstasks2"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={"MAGNE_URL": node.tls_url, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
    assert out.returncode == 2, out.stderr
    assert "not signed by a CA this client trusts" in out.stderr and "Traceback" not in out.stderr
