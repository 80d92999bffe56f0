"""Extra, throwaway RabbitMQ nodes for tests (a 3-node cluster on 5682..5684, TLS nodes), beside the system node.

Why: failover, quorum-queue and TLS tests need brokers they may stop, restart and reconfigure, while the system node
(rabbit@localhost, 127.0.0.1:5672) is shared and must never be touched. So each node here has its own name
(magnetest*@localhost), ports, dirs, config, cookie and an empty rabbitmq-env.conf, and runs from the package's own
sbin scripts (the PATH wrappers switch user and read /etc/rabbitmq/rabbitmq-env.conf, which forces the node name).
All listeners bind 127.0.0.1, every wait has a deadline, and only processes carrying our node names are ever killed.
"""

from __future__ import annotations

import atexit
import datetime
import glob
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

_FOUND = glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin")
SBIN = Path(os.environ.get("MAGNE_RABBITMQ_SBIN") or (max(_FOUND) if _FOUND else "/usr/lib/rabbitmq/sbin"))
ERL_FLAGS = "-kernel inet_dist_use_interface {127,0,0,1}"  # distribution port on 127.0.0.1 too, like the system node's


class NodeError(RuntimeError):
    """A node failed to start or a CLI call failed; the message carries the CLI output or the node's log tail."""


def wait_for(what: str, cond: Callable[[], object], timeout: float, interval: float = 0.2) -> None:
    """Poll `cond` until truthy; TimeoutError after `timeout` s (no sleep here is ever unbounded)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def find_pids(name_prefix: str = "magnetest") -> list[int]:
    """Pids (VM, erl_child_setup, CLI) of nodes whose name starts with `name_prefix`, found by RABBITMQ_NODENAME.

    The 3.10 VM's command line has no node name (rabbit sets it at boot), but the VM inherits our RABBITMQ_NODENAME,
    which the system node's environment lacks: matching it can never hit rabbit@localhost."""
    marker, pids = f"RABBITMQ_NODENAME={name_prefix}".encode(), []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                env = Path(entry.path, "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(var.startswith(marker) for var in env) and Path(entry.path, "comm").read_text().strip() != "epmd":
                pids.append(int(entry.name))  # epmd is shared with the system node: if one of ours started it, it stays
    return pids


def kill_leftovers(name_prefix: str = "magnetest", timeout: float = 10.0) -> list[int]:
    """SIGKILL (by pid) what a crashed run left of our nodes, wait until it is gone; return the pids.
    Also removes base dirs (<tmp>/magnetest*-<pid>-<hex>) whose creating process is gone."""
    for d in Path(tempfile.gettempdir()).glob("magnetest*-*-*"):
        if (m := re.fullmatch(r"magnetest[\w-]*-(\d+)-[0-9a-f]{6}", d.name)) and not Path("/proc", m[1]).exists():
            shutil.rmtree(d, ignore_errors=True)
    pids = find_pids(name_prefix)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(f"leftover {name_prefix}* processes to die", lambda: not find_pids(name_prefix), timeout)
    return pids


def _temp_base(prefix: str) -> Path:
    return Path(tempfile.gettempdir()) / f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


class Node:
    """One node: own name, AMQP and dist ports, dirs and config under `base`/<short name>.

    Building one only computes paths; `start()` writes the files and boots the VM in its own session, so a Ctrl-C
    of the test run does not reach it, and `stop()`/`kill()` can reap the whole process group."""

    def __init__(self, name: str, port: int, dist_port: int, base: Path | None = None, *, home: Path | None = None,
                 plugins: Iterable[str] = (), extra_conf: str = "") -> None:
        self.name, self.port, self.dist_port, self.plugins, self.extra_conf = name, port, dist_port, list(plugins), extra_conf
        self._owns_base, self.base = base is None, Path(base or _temp_base("magnetest"))
        self.dir = self.base / name.split("@")[0]
        self.home = home or self.dir / "home"  # holds .erlang.cookie; the nodes of a cluster share it
        self.log_dir, self.config_file = self.dir / "log", self.dir / "rabbitmq.conf"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} :{self.port}>"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def ports(self) -> list[int]:
        return [self.port, self.dist_port]

    def config(self) -> str:
        """rabbitmq.conf. guest may log in: 127.0.0.1 is loopback (default `loopback_users.guest = true`)."""
        return f"listeners.tcp.local = 127.0.0.1:{self.port}\n{self.extra_conf}\n"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(HOME=str(self.home), LANG="C.UTF-8", LC_ALL="C.UTF-8", ERL_EPMD_ADDRESS="127.0.0.1", ERL_FLAGS=ERL_FLAGS,
                   RABBITMQ_NODENAME=self.name, RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(self.port),
                   RABBITMQ_DIST_PORT=str(self.dist_port), RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
                   RABBITMQ_LOG_BASE=str(self.log_dir), RABBITMQ_CONFIG_FILE=str(self.config_file),
                   RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"), RABBITMQ_PID_FILE=str(self.dir / "node.pid"),
                   RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
                   RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"))  # an empty file: "" would mean the system one
        return env

    def _write_files(self) -> None:
        for d in (self.home, self.log_dir, self.dir / "mnesia"):
            d.mkdir(parents=True, exist_ok=True)
        if not (cookie := self.home / ".erlang.cookie").exists():
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)
        self.config_file.write_text(self.config())
        (self.dir / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")

    def spawn(self) -> None:
        """Boot the VM without waiting (a Cluster boots its nodes in parallel, then waits on each)."""
        if not (SBIN / "rabbitmq-server").exists():
            raise NodeError(f"no rabbitmq-server under {SBIN}: install rabbitmq-server or set MAGNE_RABBITMQ_SBIN")
        if self.is_alive():
            raise NodeError(f"{self.name} is already running")
        kill_leftovers(self.name)
        for port in self.ports:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise NodeError(f"{self.name}: port 127.0.0.1:{port} is already in use by another process")
        self._write_files()
        atexit.unregister(self.close)
        atexit.register(self.close)
        with open(self.dir / "stdout.log", "ab") as out:
            self._proc = subprocess.Popen([str(SBIN / "rabbitmq-server")], env=self.env, cwd=self.dir, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self, timeout: float = 60.0) -> None:
        """Wait until the rabbit app runs; fail at once, with the log tail, if the VM exits, or at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_alive():
                rc = self._proc and self._proc.returncode
                raise NodeError(f"{self.name} exited during startup (rc={rc})\n{self.log_tail()}")
            if (left := deadline - time.monotonic()) <= 0:
                raise NodeError(f"{self.name} did not start within {timeout:.0f}s\n{self.log_tail()}")
            step = int(max(1, min(left, 10)))
            try:  # await_startup fails at once (rc 69) while the node is not reachable yet: retry until the deadline
                r = self.cli("rabbitmqctl", "await_startup", "--timeout", str(step), check=False, timeout=step + 20)
                if r.returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.3)

    def start(self, timeout: float = 60.0) -> None:
        self.spawn()
        self.wait_started(timeout)

    def stop(self, timeout: float = 60.0, *, wait: bool = True) -> None:
        """Full node stop, returning once no OS process of this node is left (SIGKILL after `timeout`).

        SIGTERM to the script is forwarded to the VM, which stops rabbit cleanly, as `rabbitmqctl stop` would, but
        needs no CLI round trip. `wait=False` only sends the signal (to stop several nodes in parallel)."""
        if self.is_alive():
            assert self._proc is not None
            self._proc.terminate()
        if not wait:
            return
        try:
            if self._proc is not None:
                self._proc.wait(timeout)
            wait_for(f"{self.name} processes to exit", lambda: not find_pids(self.name), min(timeout, 15))
        except (subprocess.TimeoutExpired, TimeoutError):
            self.kill()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the node's process group and anything else carrying its node name. Never raises."""
        try:
            if self._proc is not None and self._proc.poll() is None:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(10)
            kill_leftovers(self.name)
        except (OSError, subprocess.TimeoutExpired, TimeoutError):
            pass
        self._proc = None

    def close(self) -> None:
        """Stop the node and remove its base dir if it made it. Idempotent; registered with atexit by `spawn()`."""
        atexit.unregister(self.close)
        self.stop(30)
        if self._owns_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")

    def is_alive(self) -> bool:
        """The OS process is there (cheap: no CLI call)."""
        return self._proc is not None and self._proc.poll() is None

    def is_running(self) -> bool:
        """The OS process is there and the rabbit application runs (False after `stop_app`)."""
        return self.is_alive() and self.cli("rabbitmqctl", "eval", "rabbit:is_running().", check=False).stdout.strip() == "true"

    def cli(self, tool: str, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run an SBIN tool (rabbitmqctl, rabbitmq-queues, rabbitmq-diagnostics...) against this node only."""
        r = subprocess.run([str(SBIN / tool), "-n", self.name, *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode:
            raise NodeError(f"{tool} {' '.join(args)} on {self.name} failed (rc={r.returncode}):\n{r.stdout}{r.stderr}")
        return r

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """rabbitmqctl against this node; returns stdout, raises NodeError on failure."""
        return self.cli("rabbitmqctl", *args, timeout=timeout).stdout

    def log_tail(self, lines: int = 40) -> str:
        out = [f"--- {f} ---\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:])
               for f in [self.dir / "stdout.log", *sorted(self.log_dir.glob("*.log"))] if f.exists()]
        return "\n".join(out) or f"(no logs under {self.dir})"


class Cluster:
    """`size` nodes <prefix>1..N@localhost on AMQP ports `port`.. and dist ports `dist_port`.., in one cluster.

    Use as a context manager, or call `close()` in a fixture's teardown (idempotent, also registered with atexit)."""

    def __init__(self, size: int = 3, *, port: int = 5682, dist_port: int = 25682, prefix: str = "magnetest",
                 base: Path | None = None) -> None:
        self.base = base or _temp_base(prefix)
        home = self.base / "home"  # one cookie for the whole cluster
        self.nodes = [Node(f"{prefix}{i + 1}@localhost", port + i, dist_port + i, self.base, home=home) for i in range(size)]
        self._closed = False

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 120.0) -> Cluster:
        """Boot all nodes in parallel, join 2..N to node 1 (stop_app, join_cluster, start_app), wait for N running."""
        self._closed = False
        atexit.register(self.close)
        deadline = time.monotonic() + timeout
        try:
            for n in self.nodes:
                n.spawn()
            for n in self.nodes:
                n.wait_started(max(1.0, deadline - time.monotonic()))
            for n in self.nodes[1:]:
                n.stop_app()
                n.ctl("join_cluster", self.nodes[0].name)
                n.start_app()
            wait_for(f"{len(self.nodes)} running nodes", lambda: len(self.running_nodes()) == len(self.nodes),
                     max(1.0, deadline - time.monotonic()), 0.5)
        except BaseException:
            self.close()
            raise
        return self

    def _any_node(self) -> Node:
        return next((n for n in self.nodes if n.is_alive()), self.nodes[0])

    def running_nodes(self) -> list[str]:
        """Names of the running cluster members, from `cluster_status` on a live node."""
        return json.loads(self._any_node().ctl("cluster_status", "--formatter", "json"))["running_nodes"]

    def node_by_name(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def leader_of(self, queue: str, vhost: str = "/", timeout: float = 30.0) -> Node:
        """The node leading quorum queue `queue`, from `list_queues name leader` (3.10 has the item; JSON output);
        waits (bounded) while an election is going on, and ignores a leader reported on a node that is down."""
        alive = {n.name for n in self.nodes if n.is_alive()}
        found: list[str] = []

        def leader() -> bool:
            rows = json.loads(self._any_node().ctl("list_queues", "-p", vhost, "--formatter", "json", "name", "leader"))
            found[:] = [r["leader"] for r in rows if r["name"] == queue and r.get("leader") in alive]
            return bool(found)

        wait_for(f"a leader of quorum queue {queue!r}", leader, timeout, 0.5)
        return self.node_by_name(found[0])

    def close(self) -> None:
        """Stop every node (SIGTERM all, then wait on each) and remove the dirs. Idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for n in self.nodes:
            n.stop(wait=False)
        for n in self.nodes:
            try:
                n.close()
            except Exception:
                n.kill()
        shutil.rmtree(self.base, ignore_errors=True)


@dataclass(frozen=True)
class Certs:
    """PEM paths from `make_certs`. `ca` signs server, server_expired (both with server_key; SAN localhost and
    127.0.0.1) and client (CN=guest, for EXTERNAL). `other_ca` is unrelated (untrusted) and signs other_client."""

    dir: Path
    ca: Path
    ca_key: Path
    server: Path
    server_key: Path
    server_expired: Path
    client: Path
    client_key: Path
    other_ca: Path
    other_ca_key: Path
    other_client: Path
    other_client_key: Path

    def client_context(self, cafile: Path | None = None, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client context trusting `cafile` (default: our CA), presenting `cert` = (cert, key) if given."""
        ctx = ssl.create_default_context(cafile=str(cafile or self.ca))
        if cert:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        return ctx


def make_certs(directory: Path) -> Certs:
    """Generate both CAs and every key and certificate into `directory` (EC P-256: milliseconds, unlike RSA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now, paths = datetime.datetime.now(datetime.UTC), {"dir": directory}
    Key, Issuer = ec.EllipticCurvePrivateKey, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]

    def save(stem: str, cert: x509.Certificate, key: Key | None) -> None:
        paths[stem] = directory / f"{stem}.pem"
        paths[stem].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            paths[f"{stem}_key"] = path = directory / f"{stem}_key.pem"
            path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
            path.chmod(0o600)

    def issue(cn: str, key: Key, issuer: Issuer | None, usage: x509.ObjectIdentifier | None = None,
              days: tuple[int, int] = (-1, 30)) -> x509.Certificate:
        signer = issuer[1] if issuer else key
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "magne")])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer[0].subject if issuer else name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now + datetime.timedelta(days=days[0])).not_valid_after(now + datetime.timedelta(days=days[1]))
             .add_extension(x509.BasicConstraints(ca=not issuer, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(True, False, False, False, False, not issuer, not issuer, False, False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False))
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if usage is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(signer, hashes.SHA256())

    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    ca_key, other_key, server_key, client_key, other_client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(5))
    save("ca", ca := issue("magne test CA", ca_key, None), ca_key)
    save("other_ca", other := issue("magne test untrusted CA", other_key, None), other_key)
    save("server", issue("localhost", server_key, (ca, ca_key), server), server_key)
    save("server_expired", issue("localhost", server_key, (ca, ca_key), server, (-30, -1)), None)
    save("client", issue("guest", client_key, (ca, ca_key), client), client_key)
    save("other_client", issue("guest", other_client_key, (other, other_key), client), other_client_key)
    return Certs(**paths)


class TLSNode(Node):
    """A node with a TLS listener (verify_peer) besides TCP, offering EXTERNAL (rabbitmq_auth_mechanism_ssl, user =
    client cert CN). `require_client_cert` sets fail_if_no_peer_cert; `expired` serves the expired server cert.
    Without `certs`, they are generated under the node's dir by `start()`, which then sets `self.certs`."""

    def __init__(self, name: str = "magnetest-tls1@localhost", port: int = 5690, dist_port: int = 25690,
                 base: Path | None = None, *, tls_port: int = 5691, certs: Certs | None = None,
                 require_client_cert: bool = False, expired: bool = False, home: Path | None = None) -> None:
        super().__init__(name, port, dist_port, base, home=home, plugins=["rabbitmq_auth_mechanism_ssl"])
        self.tls_port, self.certs, self.require_client_cert, self.expired = tls_port, certs, require_client_cert, expired

    @property
    def ports(self) -> list[int]:
        return [self.port, self.dist_port, self.tls_port]

    @property
    def tls_url(self) -> str:
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/%2F"

    def _write_files(self) -> None:
        if self.certs is None:
            self.certs = make_certs(self.dir / "certs")
        super()._write_files()

    def config(self) -> str:
        c = self.certs
        assert c is not None
        return super().config() + "\n".join([
            f"listeners.ssl.local = 127.0.0.1:{self.tls_port}",
            f"ssl_options.cacertfile = {c.ca}",
            f"ssl_options.certfile = {c.server_expired if self.expired else c.server}",
            f"ssl_options.keyfile = {c.server_key}",
            "ssl_options.verify = verify_peer",
            f"ssl_options.fail_if_no_peer_cert = {str(self.require_client_cert).lower()}",
            "auth_mechanisms.1 = PLAIN", "auth_mechanisms.2 = AMQPLAIN", "auth_mechanisms.3 = EXTERNAL",
            "ssl_cert_login_from = common_name", ""])
