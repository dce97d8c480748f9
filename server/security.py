"""Transport security and the bearer token: TLS (optionally mutual) on the gRPC port, and ONE
server interceptor that decides which calls need the token. docs/security.md is the operator's
side of this module.

Which calls need the token, when one is configured (service.token or service.token_file):

    FusionService/Predict, FusionService/Stats       only with protect_reads
    grpc.reflection.*                                only with protect_reads
    grpc.health.v1.Health/*                          only with protect_health
    every other method (RecordOutcome, RecordOutcomes, RecordOutcomeBatches, Checkpoint, and any
    method added later)
                                                     always: unknown methods fail closed

A call that needs the token and carries no "authorization: Bearer <token>" metadata gets
UNAUTHENTICATED; one whose token is wrong gets PERMISSION_DENIED. Tokens are compared in constant
time (hmac.compare_digest). Neither the token nor what a caller sent is ever logged or echoed.
Without a configured token nothing is protected, and the service logs a warning at start.

TLS material and the token file are re-read when they change on disk (checked at each new
connection for the certificates, at most once per second for the token file), so both rotate
without a restart; a file that cannot be read keeps the previous material and logs a warning.

    >>> from titan_fusion.server.settings import ServiceConfig
    >>> policy = AccessPolicy(ServiceConfig(), tokens=None)
    >>> policy.needs_token("/titan.fusion.v1.FusionService/RecordOutcome")
    False
"""
from __future__ import annotations

import hmac
import logging
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable

import grpc

from .errors import ConfigError
from .settings import SERVICE_PREFIX, TOKEN_RULE, ServiceConfig, token_ok

log = logging.getLogger("titan_fusion.server.security")

FUSION_SERVICE = "titan.fusion.v1.FusionService"
READ_METHODS = frozenset({f"/{FUSION_SERVICE}/Predict", f"/{FUSION_SERVICE}/Stats"})
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
AUTH_HEADER = "authorization"
BEARER = "bearer "
TOKEN_RELOAD_SECONDS = 1.0


# --- the token ----------------------------------------------------------------------------------

def _read_tokens(path: Path) -> tuple[tuple[str, ...], list[int]]:
    """The tokens in a token file: one per non-empty line, '#' starts a comment line; and the
    numbers of the lines that are not valid tokens (settings.token_ok, as for the `token` setting),
    which are not accepted."""
    tokens, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if token_ok(token):
            tokens.append(token)
        else:
            bad.append(number)
    return tuple(tokens), bad


def _bad_lines(bad: list[int]) -> str:
    return f"line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}: a token {TOKEN_RULE}"


class TokenSource:
    """The accepted bearer tokens: the `token` setting, or the lines of `token_file`, re-read
    when the file changes (at most every `reload_seconds`)."""

    def __init__(self, token: str = "", token_file: str = "", *, reload_seconds: float = TOKEN_RELOAD_SECONDS):
        self._file = Path(token_file) if token_file else None
        self._reload_seconds = reload_seconds
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        if self._file is None:
            self._tokens = (token,) if token else ()
            self._stamp: Any = None
            return
        self._stamp = self._signature()
        try:
            tokens, bad = _read_tokens(self._file)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(SERVICE_PREFIX + "token_file",
                              f"{self._file}: cannot read it ({getattr(e, 'strerror', None) or type(e).__name__})") from None
        if bad:  # at start, refused: an operator is there to fix the file
            raise ConfigError(SERVICE_PREFIX + "token_file", f"{self._file}: {_bad_lines(bad)}")
        if not tokens:
            raise ConfigError(SERVICE_PREFIX + "token_file", f"{self._file}: holds no token")
        self._tokens = tokens

    @classmethod
    def from_config(cls, config: ServiceConfig) -> "TokenSource | None":
        if not (config.token or config.token_file):
            return None
        return cls(config.token, config.token_file)

    def _signature(self) -> Any:
        try:
            st = os.stat(self._file)  # type: ignore[arg-type]
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def tokens(self) -> tuple[str, ...]:
        if self._file is None:
            return self._tokens
        now = time.monotonic()
        if now - self._checked < self._reload_seconds:
            return self._tokens
        with self._lock:
            if now - self._checked < self._reload_seconds:
                return self._tokens
            self._checked = now
            stamp = self._signature()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    tokens, bad = _read_tokens(self._file)
                except (OSError, UnicodeDecodeError) as e:
                    tokens, bad = (), []
                    why = getattr(e, "strerror", None) or type(e).__name__
                else:
                    why = "it holds no valid token"
                if bad:  # the valid lines are the tokens now (a revocation must not wait for a typo)
                    log.warning("token file %s: %s; not accepted", self._file, _bad_lines(bad))
                if tokens:
                    self._tokens = tokens
                    log.info("token file %s re-read: %d token(s) accepted", self._file, len(tokens))
                else:
                    log.warning("token file %s changed but %s: the previous token(s) stay in force",
                                self._file, why)
        return self._tokens

    def accepts(self, presented: str) -> bool:
        """Constant-time comparison against every accepted token (no early exit)."""
        given = presented.encode("utf-8", "surrogateescape")
        ok = False
        for token in self.tokens():
            ok |= hmac.compare_digest(given, token.encode("utf-8"))
        return ok


# --- who needs the token ------------------------------------------------------------------------

class AccessPolicy:
    """Which methods need the token, from the settings."""

    def __init__(self, config: ServiceConfig, tokens: TokenSource | None):
        self.tokens = tokens
        self.protect_reads = config.protect_reads
        self.protect_health = config.protect_health

    def needs_token(self, method: str) -> bool:
        if self.tokens is None:
            return False
        if method in READ_METHODS or method.startswith(REFLECTION_PREFIXES):
            return self.protect_reads
        if method.startswith(HEALTH_PREFIX):
            return self.protect_health
        return True  # mutating, or unknown: fail closed

    def check(self, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None if the call may proceed, else the (code, message) to refuse it with."""
        header = None
        for key, value in metadata or ():
            if key == AUTH_HEADER:
                header = value
                break
        if header is None:
            return (grpc.StatusCode.UNAUTHENTICATED,
                    "this call needs a bearer token: send the metadata \"authorization: Bearer <token>\"")
        if isinstance(header, bytes):
            header = header.decode("utf-8", "replace")
        if not header[:len(BEARER)].lower() == BEARER or not header[len(BEARER):].strip():
            return (grpc.StatusCode.UNAUTHENTICATED,
                    "malformed authorization metadata: expected \"Bearer <token>\"")
        assert self.tokens is not None
        if not self.tokens.accepts(header[len(BEARER):].strip()):
            return grpc.StatusCode.PERMISSION_DENIED, "the bearer token is not valid for this service"
        return None


def _refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with `code`."""
    def refuse(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


class TokenInterceptor(grpc.ServerInterceptor):
    """The one place where a call's bearer token is checked (see the module's docstring).

    on_refused(method, code): called for each refused call (the service counts it in
    fusion_rpc_errors_total)."""

    def __init__(self, policy: AccessPolicy,
                 on_refused: Callable[[str, grpc.StatusCode], None] | None = None):
        self.policy = policy
        self._on_refused = on_refused

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if not self.policy.needs_token(method):
            return continuation(handler_call_details)
        refusal = self.policy.check(handler_call_details.invocation_metadata)
        handler = continuation(handler_call_details)
        if refusal is None or handler is None:  # unknown methods stay UNIMPLEMENTED
            return handler
        code, message = refusal
        log.warning("refused %s: %s", method, code.name)  # never what the caller sent
        if self._on_refused is not None:
            try:
                self._on_refused(method, code)
            except Exception:  # noqa: BLE001 - accounting never breaks the refusal
                log.exception("counting a refused call failed")
        return _refusing_handler(handler, code, message)


# --- TLS ----------------------------------------------------------------------------------------

def _read_pem(path: str, parameter: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(SERVICE_PREFIX + parameter, f"{path}: cannot read it ({e.strerror or e})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(SERVICE_PREFIX + parameter, f"{path}: not a PEM file")
    return data


def _check_pair(cert_file: str, key_file: str) -> None:
    """The certificate chain loads and the key is its own (Python's ssl, before gRPC sees them:
    gRPC reports a bad pair only as a failure to bind the port). No OpenSSL security level: gRPC's
    BoringSSL has none and serves a 1024-bit RSA key or a SHA-1 signature, so refusing them here
    would stop a service that starts today."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert_file)  # the certificates alone
    except ssl.SSLError as e:
        raise ConfigError(SERVICE_PREFIX + "tls_cert_file",
                          f"{cert_file}: no certificate can be read from it ({e.reason or e})") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("ALL:@SECLEVEL=0")
    try:  # a password-protected key fails here (gRPC cannot use one) instead of prompting for it
        context.load_cert_chain(cert_file, key_file, password=lambda: b"")
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(SERVICE_PREFIX + "tls_key_file",
                              f"{key_file}: not the private key of the certificate in {cert_file}") from None
        raise ConfigError(SERVICE_PREFIX + "tls_key_file",
                          f"{key_file}: not a usable private key (unencrypted PEM) for the certificate in "
                          f"{cert_file} ({e.reason or e})") from None


class CertificateReloader:
    """The server's TLS material, re-read when a file changes: gRPC asks `fetch()` before each
    new connection's handshake; it answers a new configuration only when the files changed."""

    def __init__(self, config: ServiceConfig):
        self._paths = {"tls_cert_file": config.tls_cert_file, "tls_key_file": config.tls_key_file}
        if config.tls_client_ca_file:
            self._paths["tls_client_ca_file"] = config.tls_client_ca_file
        self.require_client_auth = bool(config.tls_client_ca_file)
        self._lock = threading.Lock()
        self._stamp = self._signature()
        self.initial = self._configuration()  # ConfigError naming the parameter if unreadable

    def _signature(self) -> tuple:
        out = []
        for path in self._paths.values():
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def _configuration(self) -> Any:
        pem = {name: _read_pem(path, name) for name, path in self._paths.items()}
        _check_pair(self._paths["tls_cert_file"], self._paths["tls_key_file"])
        return grpc.ssl_server_certificate_configuration(
            [(pem["tls_key_file"], pem["tls_cert_file"])], root_certificates=pem.get("tls_client_ca_file"))

    def fetch(self) -> Any:
        try:
            with self._lock:
                stamp = self._signature()
                if stamp == self._stamp:
                    return None
                self._stamp = stamp
                configuration = self._configuration()
            log.info("TLS certificate files changed: new connections use the new ones")
            return configuration
        except Exception as e:  # noqa: BLE001 - gRPC's callback: keep the current material
            log.warning("TLS certificate files changed but cannot be used (%s): keeping the current ones", e)
            return None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch,
                                                   require_client_authentication=self.require_client_auth)


def server_credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' files (reloading on change); None for plaintext."""
    if not config.tls_cert_file:
        return None
    return CertificateReloader(config).credentials()


def log_posture(config: ServiceConfig, tokens: TokenSource | None) -> None:
    """One line on what is protected; a warning when anything that changes the model is open."""
    tls = ("mutual TLS" if config.tls_client_ca_file else "TLS") if config.tls_cert_file else "plaintext"
    if tokens is None:
        log.warning("no token configured (service.token / TITAN_FUSION_TOKEN / service.token_file): "
                    "RecordOutcome, the bulk RecordOutcomes/RecordOutcomeBatches and Checkpoint are open to "
                    "every client that reaches "
                    "%s:%s (%s)", config.host, config.port, tls)
        return
    protected = ["RecordOutcome", "RecordOutcomes", "RecordOutcomeBatches", "Checkpoint"]
    if config.protect_reads:
        protected += ["Predict", "Stats", "reflection"]
    if config.protect_health:
        protected.append("health")
    log.info("gRPC over %s; bearer token required on %s", tls, ", ".join(protected))
    if not config.tls_cert_file:
        log.warning("a token is configured but TLS is off: the token crosses the network in clear text "
                    "(set service.tls_cert_file and service.tls_key_file)")
