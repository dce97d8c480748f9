"""Security, for real: TLS and mutual TLS with certificates made here (the `cryptography`
package), the bearer token checked by the one interceptor on a real server on port 0, through
real channels, the real FusionClient and the real `titan-fusion` health/stats commands.

What is protected and why: docs/security.md.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service_helpers import SERVING, events, rpc_error, start, to_pb_experts
from titan_fusion.client import (FusionClient, PermissionDeniedError, UnauthenticatedError,
                                 UnavailableError)
from titan_fusion.client.client import tls_credentials
from titan_fusion.client.pb import fusion_pb2 as pb
from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc
from titan_fusion.server import cli
from titan_fusion.server.errors import ConfigError
from titan_fusion.server.security import TokenSource
from titan_fusion.server.settings import MASK, ServiceConfig, load_settings

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gen_certs", ROOT / "scripts" / "gen_certs.py")
gen_certs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_certs)  # type: ignore[union-attr]

TOKEN = "tok-7f3a9c1e5b2d4f60a8e1"  # >= 16 characters; must never show in a log or a dump
WRONG = "not-the-token-0123456789"
EVENT = events(5, 1)[0]


# --- fixtures ----------------------------------------------------------------------------------

def _write(directory: Path, **files: bytes) -> SimpleNamespace:
    out = {}
    for name, data in files.items():
        path = directory / name.replace("_", ".")
        path.write_bytes(data)
        out[name] = str(path)
    return SimpleNamespace(**out)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate signed by it;
    an unrelated ("rogue") CA with its own client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = gen_certs.make_ca("test CA")
    server, server_key = gen_certs.make_leaf(ca, ca_key, "localhost", hosts=("localhost", "127.0.0.1"))
    client, client_key = gen_certs.make_leaf(ca, ca_key, "client", client=True)
    rogue, rogue_key = gen_certs.make_ca("rogue CA")
    rogue_client, rogue_client_key = gen_certs.make_leaf(rogue, rogue_key, "rogue client", client=True)
    return _write(d, ca_pem=ca, ca_key=ca_key, server_pem=server, server_key=server_key, client_pem=client,
                  client_key=client_key, rogue_pem=rogue, rogue_key=rogue_key, rogueclient_pem=rogue_client,
                  rogueclient_key=rogue_client_key)


class Server:
    def __init__(self, tmp: Path, **changes: Any):
        self.svc, self.port, self.registry = start(tmp / "data", **changes)
        self.target = f"127.0.0.1:{self.port}"
        self._closables: list[Any] = []

    def client(self, **kwargs: Any) -> FusionClient:
        kwargs.setdefault("timeout", 5)
        kwargs.setdefault("fallback", False)
        c = FusionClient(self.target, **kwargs)
        self._closables.append(c)
        return c

    def channel(self, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        ch = grpc.secure_channel(self.target, credentials) if credentials else grpc.insecure_channel(self.target)
        self._closables.append(ch)
        return ch

    def close(self) -> None:
        for c in self._closables:
            c.close()
        self.svc.stop(grace=0)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def make(**changes: Any) -> Server:
        s = Server(tmp_path / f"s{len(servers)}", **changes)
        servers.append(s)
        return s

    try:
        yield make
    finally:
        for s in servers:
            s.close()


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's client commands read $TITAN_FUSION_TOKEN(_FILE): keep the caller's out."""
    for var in ("TITAN_FUSION_TOKEN", "TITAN_FUSION_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def experts_and_features() -> tuple[list[dict], dict]:
    experts, features, _ = EVENT
    return experts, features


def record(client: FusionClient, event_id: str) -> Any:
    experts, features = experts_and_features()
    return client.record_outcome(experts, features, actual_direction="UP", event_id=event_id)


def reflection_services(channel: grpc.Channel, metadata: Any = None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          metadata=metadata, timeout=5)
    return [s.name for r in responses for s in r.list_services_response.service]


# --- TLS -----------------------------------------------------------------------------------------

def test_tls_with_the_right_ca_works_and_a_client_without_it_fails(serve: Any, pki: SimpleNamespace) -> None:
    s = serve(tls_cert_file=pki.server_pem, tls_key_file=pki.server_key)
    ok = s.client(credentials=tls_credentials(ca_file=pki.ca_pem))
    experts, features = experts_and_features()
    assert ok.predict(experts, features).source == "average"
    assert ok.stats()["samples_trained"] == 0

    with pytest.raises(UnavailableError):  # the server's certificate is not signed by this CA
        s.client(credentials=tls_credentials(ca_file=pki.rogue_pem), timeout=2).stats()
    with pytest.raises(UnavailableError):  # plaintext against the TLS port: no handshake
        s.client(timeout=2).stats()
    # The fallback still serves a trader whose TLS setup is wrong (UNAVAILABLE is a transport error).
    p = s.client(credentials=tls_credentials(ca_file=pki.rogue_pem), timeout=2, fallback=True).predict(experts)
    assert (p.source, p.reason) == ("average", "unavailable")


def test_mutual_tls_requires_a_client_certificate_signed_by_the_client_ca(serve: Any, pki: SimpleNamespace) -> None:
    s = serve(tls_cert_file=pki.server_pem, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca_pem)
    good = s.client(credentials=tls_credentials(pki.ca_pem, pki.client_pem, pki.client_key))
    assert good.stats()["samples_trained"] == 0
    with pytest.raises(UnavailableError):  # no client certificate
        s.client(credentials=tls_credentials(ca_file=pki.ca_pem), timeout=2).stats()
    with pytest.raises(UnavailableError):  # a certificate from another CA
        s.client(credentials=tls_credentials(pki.ca_pem, pki.rogueclient_pem, pki.rogueclient_key), timeout=2).stats()
    # The health command (what the container's HEALTHCHECK runs) speaks mutual TLS with flags.
    assert cli.main(["health", "--target", s.target, "--ca", pki.ca_pem, "--cert", pki.client_pem,
                     "--key", pki.client_key]) == 0
    assert cli.main(["health", "--target", s.target, "--ca", pki.ca_pem, "--timeout", "2"]) == 1


def test_tls_client_helper_refuses_half_a_client_pair(pki: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        tls_credentials(pki.ca_pem, cert_file=pki.client_pem)


def test_certificates_rotate_without_a_restart(serve: Any, pki: SimpleNamespace, tmp_path: Path) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(Path(pki.server_pem).read_bytes())
    key.write_bytes(Path(pki.server_key).read_bytes())
    s = serve(tls_cert_file=str(cert), tls_key_file=str(key))
    old = s.client(credentials=tls_credentials(ca_file=pki.ca_pem))
    assert old.stats()["samples_trained"] == 0

    # A new CA and a new server certificate, swapped in atomically (rename), key first.
    ca2, ca2_key = gen_certs.make_ca("second CA")
    cert2, key2 = gen_certs.make_leaf(ca2, ca2_key, "localhost", hosts=("127.0.0.1",))
    (tmp_path / "ca2.pem").write_bytes(ca2)
    for path, data in ((key, key2), (cert, cert2)):
        path.with_suffix(".new").write_bytes(data)
        os.replace(path.with_suffix(".new"), path)

    fresh = s.client(credentials=tls_credentials(ca_file=str(tmp_path / "ca2.pem")))
    assert fresh.stats()["samples_trained"] == 0  # a new connection gets the new certificate
    with pytest.raises(UnavailableError):
        s.client(credentials=tls_credentials(ca_file=pki.ca_pem), timeout=2).stats()
    assert old.stats()["samples_trained"] == 0  # an established connection goes on


# --- the token -------------------------------------------------------------------------------------

def test_mutating_rpcs_need_the_token(serve: Any) -> None:
    s = serve(token=TOKEN)
    anonymous, wrong, right = s.client(), s.client(token=WRONG), s.client(token=TOKEN)

    with pytest.raises(UnauthenticatedError, match="needs a bearer token"):
        record(anonymous, "e1")
    with pytest.raises(PermissionDeniedError, match="not valid"):
        record(wrong, "e1")
    assert record(right, "e1").samples_trained == 1

    with pytest.raises(UnauthenticatedError):
        anonymous.checkpoint_list()
    with pytest.raises(PermissionDeniedError):
        wrong.checkpoint_save("x")
    assert right.checkpoint_save("x").name == "x"
    assert [c.name for c in right.checkpoint_list()] == ["x"]

    # Reads, health and reflection stay open by default.
    experts, features = experts_and_features()
    assert anonymous.predict(experts, features).source == "average"
    assert anonymous.stats()["samples_trained"] == 1
    ch = s.channel()
    assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
    assert "titan.fusion.v1.FusionService" in reflection_services(ch)

    # A refused call never reached the model, and is counted like any failed RPC.
    assert right.stats()["samples_trained"] == 1
    assert s.registry.get_sample_value("fusion_rpc_errors_total",
                                       {"method": "RecordOutcome", "code": "UNAUTHENTICATED"}) == 1
    assert s.registry.get_sample_value("fusion_rpc_errors_total",
                                       {"method": "Checkpoint", "code": "PERMISSION_DENIED"}) == 1


def test_a_malformed_authorization_header_is_unauthenticated(serve: Any) -> None:
    s = serve(token=TOKEN)
    stub = pb_grpc.FusionServiceStub(s.channel())
    request = pb.CheckpointRequest(action=pb.CheckpointRequest.ACTION_LIST)
    for metadata in ((("authorization", f"Basic {TOKEN}"),), (("authorization", "Bearer "),)):
        e = rpc_error(stub.Checkpoint, request, metadata=metadata, timeout=5)
        assert e.code() is grpc.StatusCode.UNAUTHENTICATED and TOKEN not in e.details()
    assert stub.Checkpoint(request, metadata=(("authorization", f"bearer {TOKEN}"),), timeout=5) is not None


@pytest.mark.parametrize("batched", [False, True], ids=["RecordOutcomes", "RecordOutcomeBatches"])
def test_the_bulk_outcome_streams_need_the_token_too(serve: Any, batched: bool) -> None:
    s = serve(token=TOKEN)
    stub = pb_grpc.FusionServiceStub(s.channel())
    experts, features = experts_and_features()
    row = pb.RecordOutcomeRequest(experts=to_pb_experts(experts), features=features,
                                  actual_direction=pb.DIRECTION_UP, event_id="bulk-0")
    call = stub.RecordOutcomeBatches if batched else stub.RecordOutcomes

    def rows() -> Iterator[Any]:
        yield pb.RecordOutcomeBatch(outcomes=[row]) if batched else row

    assert rpc_error(call, rows(), timeout=5).code() is grpc.StatusCode.UNAUTHENTICATED
    assert rpc_error(call, rows(), metadata=bearer(WRONG), timeout=5).code() is grpc.StatusCode.PERMISSION_DENIED
    result = call(rows(), metadata=bearer(TOKEN), timeout=5)
    assert (result.accepted, result.rejected) == (1, 0)


def test_protect_reads_covers_predict_stats_and_reflection(serve: Any) -> None:
    s = serve(token=TOKEN, protect_reads=True)
    anonymous, right = s.client(), s.client(token=TOKEN)
    experts, features = experts_and_features()
    with pytest.raises(UnauthenticatedError):
        anonymous.predict(experts, features)
    with pytest.raises(UnauthenticatedError):
        anonymous.stats()
    with pytest.raises(PermissionDeniedError):
        s.client(token=WRONG).stats()
    assert right.predict(experts, features).source == "average"
    assert right.stats()["samples_trained"] == 0

    ch = s.channel()
    with pytest.raises(grpc.RpcError) as e:
        reflection_services(ch)
    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "titan.fusion.v1.FusionService" in reflection_services(ch, bearer(TOKEN))
    # health stays open unless protect_health
    assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING


def test_protect_health(serve: Any, tmp_path: Path) -> None:
    s = serve(token=TOKEN, protect_health=True)
    stub = health_pb2_grpc.HealthStub(s.channel())
    e = rpc_error(stub.Check, health_pb2.HealthCheckRequest(), timeout=5)
    assert e.code() is grpc.StatusCode.UNAUTHENTICATED
    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=5)  # a server-streaming method
    with pytest.raises(grpc.RpcError) as err:
        next(watch)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert stub.Check(health_pb2.HealthCheckRequest(), metadata=bearer(TOKEN), timeout=5).status == SERVING
    # The health command takes the token from a file.
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert cli.main(["health", "--target", s.target, "--timeout", "2"]) == 1
    assert cli.main(["health", "--target", s.target, "--token-file", str(token_file)]) == 0


def test_without_a_token_everything_is_open_and_a_warning_says_so(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="titan_fusion")
    s = serve()
    assert record(s.client(), "open-1").samples_trained == 1
    assert s.client().checkpoint_save("open").name == "open"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no token configured" in w and "RecordOutcome" in w and "Checkpoint" in w for w in warnings), warnings


def test_a_token_over_plaintext_is_warned_about(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="titan_fusion")
    serve(token=TOKEN)
    assert any("TLS is off" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


# --- the token file and rotation ------------------------------------------------------------------

def test_token_file_holds_several_tokens_and_is_reread(serve: Any, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    old, new = "old-token-0123456789ab", "new-token-0123456789ab"
    path.write_text(f"# rotation in progress\n{old}\n{new}\n")
    s = serve(token_file=str(path))
    assert record(s.client(token=old), "f1").samples_trained == 1
    assert record(s.client(token=new), "f2").samples_trained == 2

    source = TokenSource(token_file=str(path), reload_seconds=0.0)
    assert source.accepts(old) and source.accepts(new) and not source.accepts(WRONG)
    path.write_text(new + "\n")  # the rotation is done: the old token is retired
    assert source.accepts(new) and not source.accepts(old)
    path.write_text("")  # an emptied file never opens the service: the last tokens stay
    assert source.accepts(new)
    path.write_text("x\n")  # nor does a placeholder become a credential
    assert source.accepts(new) and not source.accepts("x")
    # a stray line beside the valid ones is not accepted, and does not hold back the change: the
    # token it revokes is revoked at once
    path.write_text(f"{old}\n{new}\n")
    assert source.accepts(old)
    path.write_text(f"{new}\nold token revoked, see ticket 42\n")
    assert source.accepts(new) and not source.accepts(old) and not source.accepts("old token revoked, see ticket 42")


def test_unreadable_security_files_are_refused_naming_the_parameter(tmp_path: Path, pki: SimpleNamespace) -> None:
    with pytest.raises(ConfigError, match=r"^service\.tls_cert_file: .*cannot read"):
        start(tmp_path / "a", tls_cert_file=str(tmp_path / "missing.pem"), tls_key_file=pki.server_key)
    with pytest.raises(ConfigError, match=r"^service\.tls_key_file: .*not a PEM file"):
        (tmp_path / "junk").write_text("junk")
        start(tmp_path / "b", tls_cert_file=pki.server_pem, tls_key_file=str(tmp_path / "junk"))
    with pytest.raises(ConfigError, match=r"^service\.token_file: .*cannot read"):
        start(tmp_path / "c", token_file=str(tmp_path / "no-token"))
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match=r"^service\.token_file: .*holds no token"):
        start(tmp_path / "d", token_file=str(tmp_path / "empty"))
    # a token file's lines follow the token setting's rule (and the value is never shown)
    (tmp_path / "placeholder").write_text("# set me\nchangeme\n")
    with pytest.raises(ConfigError, match=r"^service\.token_file: .*line 2: a token must be at least 16 printable") as e:
        start(tmp_path / "e", token_file=str(tmp_path / "placeholder"))
    assert "changeme" not in str(e.value)
    # a key that is not the certificate's, or a corrupt certificate: named as such (gRPC alone
    # reported "cannot listen on ...", as if the port were taken)
    with pytest.raises(ConfigError, match=r"^service\.tls_key_file: .*not the private key of the certificate"):
        start(tmp_path / "f", tls_cert_file=pki.server_pem, tls_key_file=pki.client_key)
    (tmp_path / "garbled.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"^service\.tls_cert_file: .*no certificate can be read from it"):
        start(tmp_path / "g", tls_cert_file=str(tmp_path / "garbled.pem"), tls_key_file=pki.server_key)
    (tmp_path / "garbled.key").write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match=r"^service\.tls_key_file: .*not a usable private key"):
        start(tmp_path / "h", tls_cert_file=pki.server_pem, tls_key_file=str(tmp_path / "garbled.key"))


def test_the_tls_check_accepts_what_grpc_serves_a_1024_bit_rsa_key_included(tmp_path: Path) -> None:
    """OpenSSL's default security level would refuse a 1024-bit RSA key (or a SHA-1 signature, which
    this cryptography no longer makes), which gRPC (BoringSSL) serves: the start-up check must not
    stop a service that gRPC would run."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    from titan_fusion.server.security import _check_pair
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "weak.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "weak.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    _check_pair(str(tmp_path / "weak.pem"), str(tmp_path / "weak.key"))
    # Refused before the data directory was locked: a correct start on it works at once.
    svc, _, _ = start(tmp_path / "a")
    svc.stop(grace=0)


@pytest.mark.parametrize("changes, parameter", [
    (dict(tls_cert_file="c.pem"), "service.tls_key_file"),
    (dict(tls_key_file="k.pem"), "service.tls_cert_file"),
    (dict(tls_client_ca_file="ca.pem"), "service.tls_client_ca_file"),
    (dict(protect_reads=True), "service.protect_reads"),
    (dict(protect_health=True), "service.protect_health"),
    (dict(token=TOKEN, token_file="t"), "service.token"),
])
def test_inconsistent_security_settings_are_refused(changes: dict, parameter: str) -> None:
    with pytest.raises(ConfigError) as e:
        ServiceConfig(**changes)
    assert e.value.parameter == parameter and TOKEN not in str(e.value)


# --- the token never shows ------------------------------------------------------------------------

def test_the_token_never_appears_in_settings_dumps_or_errors(tmp_path: Path) -> None:
    c = load_settings(env={"TITAN_FUSION_TOKEN": TOKEN})
    assert c.token == TOKEN
    for text in (repr(c), str(c), json.dumps(c.to_dict()), str(dataclasses.replace(c, port=1))):
        assert TOKEN not in text
    assert c.to_dict()["service"]["token"] == MASK and ServiceConfig().to_dict()["service"]["token"] == ""

    short = "short-secret"
    with pytest.raises(ConfigError) as e:
        load_settings(env={"TITAN_FUSION_TOKEN": short})
    assert e.value.parameter == "service.token" and short not in str(e.value) and "TITAN_FUSION_TOKEN" in str(e.value)
    toml = tmp_path / "c.toml"
    toml.write_text("[service]\ntoken = 1234567890123456789\n")
    with pytest.raises(ConfigError) as e:
        load_settings(file=toml, env={})
    assert "1234567890123456789" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        ServiceConfig(token=" " + TOKEN)
    assert TOKEN not in str(e.value)


def test_the_token_never_appears_in_the_logs(serve: Any, caplog: pytest.LogCaptureFixture, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = serve(token=TOKEN, protect_reads=True)
    with pytest.raises(PermissionDeniedError):
        record(s.client(token=WRONG), "x")
    with pytest.raises(UnauthenticatedError):
        s.client().stats()
    record(s.client(token=TOKEN), "y")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    assert cli.main(["stats", "--target", s.target, "--token-file", str(token_file)]) == 0
    with pytest.raises(SystemExit):  # a token file that cannot be read is a usage error
        cli.main(["stats", "--target", s.target, "--token-file", str(tmp_path / "none")])
    s.close()
    out = capsys.readouterr()
    for text in (caplog.text, out.out, out.err):
        assert TOKEN not in text and WRONG not in text
    assert "refused /titan.fusion.v1.FusionService/RecordOutcome: PERMISSION_DENIED" in caplog.text


def test_the_stats_command_with_tls_and_a_token(serve: Any, pki: SimpleNamespace, tmp_path: Path,
                                                capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    s = serve(tls_cert_file=pki.server_pem, tls_key_file=pki.server_key, token=TOKEN, protect_reads=True)
    assert cli.main(["stats", "--target", s.target, "--ca", pki.ca_pem]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("TITAN_FUSION_TOKEN", TOKEN)  # the same variable the service reads
    assert cli.main(["stats", "--target", s.target, "--ca", pki.ca_pem]) == 0
    assert json.loads(capsys.readouterr().out)["samples_trained"] == 0
    # By name: the certificate names localhost, the target is an address.
    assert cli.main(["stats", "--target", s.target, "--ca", pki.ca_pem, "--tls-server-name", "localhost"]) == 0


def test_the_health_command_stays_torch_free(pki: SimpleNamespace, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    code = ("import sys; from titan_fusion.server import cli; "
            "rc = cli.main(['health', '--target', '127.0.0.1:1', '--timeout', '0.2', '--ca', sys.argv[1], "
            "'--cert', sys.argv[2], '--key', sys.argv[3], '--token-file', sys.argv[4]]); "
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))")
    r = subprocess.run([sys.executable, "-c", code, pki.ca_pem, pki.client_pem, pki.client_key, str(token_file)],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "1 []", r.stdout + r.stderr
