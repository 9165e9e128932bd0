"""Servers of a test's own, for what the shared ones cannot show: a throwaway CA and its
certificates, a Kafka broker with a SASL_SSL listener (SCRAM-SHA-512), and a PostgreSQL
cluster that accepts only TLS. Each runs on its own port in its own temp directory and
is stopped again by whoever started it.

The broker is launched as `scripts/services` launches the shared one (the same jars,
`StorageTool format` then `kafka.Kafka`), with a configuration of its own.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
KAFKA_LIBS = ROOT / ".cache" / "kafka" / "libs"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


# ----------------------------------------------------------------------------- certificates
@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate it issued for `localhost` only, and an unrelated CA."""

    ca: Path
    """The CA certificate that issued the servers' certificates (PEM)."""
    other_ca: Path
    """A CA that issued nothing here: trusting only it must refuse the servers."""
    server_cert: Path
    server_key: Path
    server_p12: Path
    """The server's key and certificate chain for Java (PKCS#12, password P12_PASSWORD)."""
    other_server_p12: Path
    """The same for a server certificate that the unrelated CA issued."""
    client_cert: Path
    client_key: Path
    """A client certificate from the CA, for the user CLIENT_USER (mutual TLS)."""


P12_PASSWORD = "test-keystore"
CLIENT_USER = "sync_cert"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _ca(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, host: str, *, client: bool = False
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate valid for `host` only (no IP address: 127.0.0.1 is another
    host name as far as verification goes), or a client certificate for the user `host`."""
    usages = x509.oid.ExtendedKeyUsageOID
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([usages.CLIENT_AUTH if client else usages.SERVER_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _keystore(
    key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, ca: x509.Certificate
) -> bytes:
    encryption = serialization.BestAvailableEncryption(P12_PASSWORD.encode())
    return pkcs12.serialize_key_and_certificates(b"server", key, cert, [ca], encryption)


def make_pki(directory: Path) -> Pki:
    """Write a throwaway PKI under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _ca("sync-service test CA")
    other_key, other = _ca("sync-service unrelated CA")
    key, cert = _issue(ca_key, ca, "localhost")
    pem = serialization.Encoding.PEM
    paths = Pki(
        ca=directory / "ca.pem",
        other_ca=directory / "other-ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        server_p12=directory / "server.p12",
        other_server_p12=directory / "other-server.p12",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    paths.ca.write_bytes(ca.public_bytes(pem))
    paths.other_ca.write_bytes(other.public_bytes(pem))
    paths.server_cert.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    paths.server_key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths.server_key.chmod(0o600)
    client_key, client_cert = _issue(ca_key, ca, CLIENT_USER, client=True)
    paths.client_cert.write_bytes(client_cert.public_bytes(pem))
    paths.client_key.write_bytes(
        client_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    paths.server_p12.write_bytes(_keystore(key, cert, ca))
    paths.other_server_p12.write_bytes(_keystore(*_issue(other_key, other, "localhost"), other))
    return paths


# ----------------------------------------------------------------------------- processes
def _run(command: list[str], timeout: float) -> None:
    done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
        raise RuntimeError(f"{command[0]} {command[1:4]} failed:\n{output}")


def _stop(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- Kafka
class SecureKafka:
    """A private broker that can be restarted, with another server certificate too."""

    def __init__(self, directory: Path, pki: Pki, port: int) -> None:
        self.sasl_ssl = f"localhost:{port}"
        """bootstrap of the SASL_SSL (SCRAM-SHA-512) listener: TLS only."""
        self.plaintext = f"localhost:{port + 2}"
        """bootstrap of the plaintext listener (the broker's own, for inter-broker traffic)."""
        self.mutual_tls = f"localhost:{port + 3}"
        """bootstrap of the SSL listener that requires a client certificate from the CA."""
        self.username, self.password = "sync-service", secrets.token_urlsafe(12)
        self._pki = pki
        self._keystore = directory / "server.p12"
        """What both TLS listeners present: a copy of one of the PKI's keystores."""
        self._logs = directory / "logs"
        self._process: subprocess.Popen[bytes] | None = None
        data = directory / "data"
        data.mkdir(parents=True)
        self._logs.mkdir()
        self._props = directory / "server.properties"
        self._props.write_text(_broker_config(port, data, self._keystore, pki))
        log4j = directory / "log4j.properties"
        log4j.write_text(_LOG4J.format(logs=self._logs))
        self._java = [
            "java", "-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{log4j}", f"-Dkafka.logs.dir={self._logs}",
            "-cp", f"{KAFKA_LIBS}/*",
        ]  # fmt: skip
        cluster_id = "-"
        while cluster_id.startswith("-"):  # one starting with '-' reads as an option
            cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        scram = f"SCRAM-SHA-512=[name={self.username},password={self.password}]"
        _run(
            [*self._java, "kafka.tools.StorageTool", "format", "-t", cluster_id,
             "-c", str(self._props), "--add-scram", scram],
            timeout=120,
        )  # fmt: skip

    def start(self, keystore: Path | None = None) -> None:
        """Start (again), presenting `keystore` (default: the PKI's server keystore)."""
        shutil.copyfile(keystore or self._pki.server_p12, self._keystore)
        log = self._logs / "server.log"
        offset = log.stat().st_size if log.exists() else 0
        with (self._logs / "kafka.out").open("ab") as out:
            self._process = subprocess.Popen(
                [*self._java, "kafka.Kafka", str(self._props)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 180
        while "Kafka Server started" not in _read_from(log, offset):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"private Kafka did not start:\n{_tail(log)}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self._process is not None:
            _stop(self._process)
            self._process = None


_LOG4J = """log4j.rootLogger=INFO, server
log4j.appender.server=org.apache.log4j.FileAppender
log4j.appender.server.File={logs}/server.log
log4j.appender.server.layout=org.apache.log4j.PatternLayout
log4j.appender.server.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
"""


def _broker_config(port: int, data: Path, keystore: Path, pki: Pki) -> str:
    listeners = (
        f"SASL_SSL://localhost:{port},CONTROLLER://localhost:{port + 1},"
        f"PLAINTEXT://localhost:{port + 2},SSL://localhost:{port + 3}"
    )
    advertised = listeners.replace(f",CONTROLLER://localhost:{port + 1}", "")
    protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL"
    scram_login = "org.apache.kafka.common.security.scram.ScramLoginModule"
    tls = "".join(
        f"""listener.name.{name}.ssl.keystore.type=PKCS12
listener.name.{name}.ssl.keystore.location={keystore}
listener.name.{name}.ssl.keystore.password={P12_PASSWORD}
listener.name.{name}.ssl.key.password={P12_PASSWORD}
"""
        for name in ("sasl_ssl", "ssl")
    )
    return f"""process.roles=broker,controller
node.id=1
controller.quorum.voters=1@localhost:{port + 1}
controller.listener.names=CONTROLLER
listeners={listeners}
advertised.listeners={advertised}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map={protocols}
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram_login} required;
{tls}listener.name.ssl.ssl.truststore.type=PEM
listener.name.ssl.ssl.truststore.location={pki.ca}
listener.name.ssl.ssl.client.auth=required
log.dirs={data}
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=3
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
"""


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


@contextlib.contextmanager
def secure_kafka(directory: Path, pki: Pki, port: int = 19092) -> Iterator[SecureKafka]:
    """A single-node KRaft broker: SASL_SSL on `port`, the controller on `port + 1`, a
    plaintext listener on `port + 2` and an SSL one that requires a client certificate on
    `port + 3`; one SCRAM-SHA-512 user, made when storage is formatted."""
    if not any(KAFKA_LIBS.glob("kafka_2.13-*.jar")):
        raise RuntimeError(f"no Kafka jars in {KAFKA_LIBS}: run scripts/services up once")
    broker = SecureKafka(directory, pki, port)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# ----------------------------------------------------------------------------- PostgreSQL
@dataclass(frozen=True)
class SecurePostgres:
    """A running private cluster that accepts TCP clients only over TLS."""

    port: int

    def url(
        self, host: str = "localhost", database: str = "postgres", user: str = "postgres"
    ) -> str:
        return f"postgresql+asyncpg://{user}@{host}:{self.port}/{database}"


def _as_postgres(*command: str) -> list[str]:
    """Run as the postgres OS user when we are root (initdb refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@contextlib.contextmanager
def secure_postgres(pki: Pki, port: int = 15432) -> Iterator[SecurePostgres]:
    """initdb + pg_ctl on `port`: `hostssl` lines only in pg_hba.conf (the user
    CLIENT_USER authenticates by client certificate, the others are trusted), the server
    certificate from `pki`. Its directory is a temp one of its own (the postgres user
    must be able to reach it), removed after."""
    directory = Path(tempfile.mkdtemp(prefix="sync-service-pg-"))
    data = directory / "pgdata"
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    try:
        with _running_postgres(directory, data, pki, port) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _running_postgres(directory: Path, data: Path, pki: Pki, port: int) -> Iterator[SecurePostgres]:
    _run(
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                     "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"),
        timeout=120,
    )  # fmt: skip
    files = ((pki.server_cert, "server.crt"), (pki.server_key, "server.key"), (pki.ca, "root.crt"))
    for source, name in files:
        target = data / name
        shutil.copyfile(source, target)
        target.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(target, "postgres", "postgres")
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(
            f"port = {port}\nlisten_addresses = 'localhost'\n"
            f"unix_socket_directories = '{directory}'\nssl = on\n"
            "ssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
            "ssl_ca_file = 'root.crt'\n"
            "fsync = off\nmax_connections = 40\nshared_buffers = 32MB\n"
        )
    (data / "pg_hba.conf").write_text(
        "local all all trust\n"
        f"hostssl all {CLIENT_USER} 127.0.0.1/32 cert\n"
        f"hostssl all {CLIENT_USER} ::1/128 cert\n"
        "hostssl all all 127.0.0.1/32 trust\n"
        "hostssl all all ::1/128 trust\n"
    )
    log = directory / "postgres.log"
    _run(
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                     "start"),
        timeout=90,
    )  # fmt: skip
    try:
        _run(
            _as_postgres(str(PG_BIN / "psql"), "-h", str(directory), "-p", str(port),
                         "-U", "postgres", "-c", f"CREATE ROLE {CLIENT_USER} LOGIN SUPERUSER"),
            timeout=60,
        )  # fmt: skip
        yield SecurePostgres(port)
    finally:
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                         "stop"),
            capture_output=True, timeout=60,
        )  # fmt: skip
