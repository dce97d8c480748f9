"""FusionClient: the titan-fusion service over gRPC, with only grpcio and protobuf installed.

It speaks two dialects:

- one typed call per RPC: `predict()`, `record_outcome()`, `stats()`, `checkpoint_save()`,
  `checkpoint_restore()`, `checkpoint_list()`, returning frozen dataclasses and dicts;
- the in-process `TransformerFusion`'s API: `forward()`, `update()`, `get_training_stats()`,
  `get_attention_weights()`, `save()`, `load()`, so that a trading ensemble switches from
  `TransformerFusion(config, n_models=4)` to `FusionClient("host:port")` by changing one line.

Deadlines. Every call carries a deadline: `timeout` seconds (1.0 by default), per attempt;
each method takes its own `timeout=` too.

Fallback (`predict()`, `forward()`). When the service cannot be reached or does not answer in time
(UNAVAILABLE, DEADLINE_EXCEEDED) and the client was made with `fallback=True` (the default), the
client serves the plain average of the experts' `prob_up` itself, as the service would while it
warms up: `Prediction(source="average", reason="unavailable", model_version=-1)`. It logs a
warning on the "titan_fusion.client" logger and counts it in `fallback_count`. A trader therefore
always gets a forecast when the service is down; with `fallback=False` it gets the
`TransportError` instead. The fallback never hides an answer of the service: INVALID_ARGUMENT,
RESOURCE_EXHAUSTED and every other `ServerError` are raised, as is `ClientClosedError`.
A forecast served locally is not known to the service: the client keeps its inputs (the last
KEPT_PREDICTIONS predictions with an event_id), and a later `record_outcome()` that sends only that
event_id sends them along. The same inputs are sent again when the service answers NOT_FOUND for
an event_id that this client predicted (the service could not keep them: its disk was full, say,
or it was replaced).

Retries (`record_outcome()`, `update()`). An outcome is retried after UNAVAILABLE or
DEADLINE_EXCEEDED, at least `retries` more times with a short exponential backoff (0.05 s,
doubling, at most 1 s), and for as long as `(retries + 1) * timeout` seconds since the first
attempt allow (a service that answers "starting" at once is retried until then, not four times in
0.4 s), ONLY when it has an `event_id`. The service de-duplicates outcomes by event_id, so a
retry can never teach the model the same candle twice; when an earlier attempt was recorded but
its answer was lost, the retry comes back `duplicate=True`, which is a success. Without an
event_id a lost answer cannot be told apart from a lost request, and a retry could train twice,
so the first error is raised. Retries wait for the channel to be ready (within their deadline)
instead of failing at once while gRPC waits to reconnect. Outcomes never fall back: when every
attempt fails, the last `TransportError` is raised; a `ResourceExhaustedError` (the service's
queue is full) is raised at once. Either way it is the caller's to keep the outcome and report it
later (with its event_id, that is safe).

Errors. Every failure of a call is a `FusionClientError` (see `titan_fusion.client.errors` for the
tree); gRPC's `RpcError` is translated in one place, `FusionClient._invoke`. Mistakes that the client
sees without asking the service (an `actual_direction` other than "UP"/"DOWN", an expert without
`prob_up`) raise `ValueError` or `TypeError` before anything is sent.

One client may be shared by threads: gRPC multiplexes their calls on the client's one channel.

>>> from titan_fusion.client import FusionClient
>>> experts = [{"name": "TrendVIC", "prob_up": 0.7}, {"name": "Oscillator", "prob_up": 0.5}]
>>> with FusionClient("127.0.0.1:1", timeout=0.2) as fusion:  # nothing listens on port 1
...     prob_up, prob_down = fusion.forward(experts)
...     fusion.fallback_count
1
>>> round(prob_up, 9), round(prob_down, 9)
(0.6, 0.4)
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc

from titan_fusion.client import convert
from titan_fusion.client.convert import BulkResult, CheckpointInfo, OutcomeAck, Prediction
from titan_fusion.client.errors import (
    ClientClosedError,
    NotFoundError,
    ServerError,
    TransportError,
    from_rpc_error,
)
from titan_fusion.client.pb import fusion_pb2 as pb
from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc

__all__ = [
    "FusionClient",
    "KEPT_PREDICTIONS",
    "KEEPALIVE_OPTIONS",
    "SERVER_KEEPALIVE_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_SIZE_OPTIONS",
    "CHANNEL_OPTIONS",
    "tls_credentials",
]

logger = logging.getLogger("titan_fusion.client")

#: Client keepalive: ping an idle connection every 30 s, drop it when a ping is not answered within
#: 10 s, so that a trader learns of a dead server (or a NAT that forgot the connection) between
#: candles rather than on its next decision.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

#: The server's side of the same agreement (the server imports it from here): it pings its clients
#: as often, and accepts their pings without calls in flight as long as they come at least 10 s
#: apart (ours come every 30 s). A client pinging faster is cut off after the default 2 strikes.
SERVER_KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
)

#: Largest message either side sends or accepts (gRPC's default receive limit). A request carries a
#: handful of experts and features; the largest answer, a checkpoint list, is far below it.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MESSAGE_SIZE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

#: The client channel's default options; `FusionClient(options=...)` overrides them by key.
#: Reconnect attempts back off to at most 5 s (gRPC's default is 120 s), so that after the service
#: comes back the client stops falling back within seconds rather than minutes.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    *KEEPALIVE_OPTIONS,
    *MESSAGE_SIZE_OPTIONS,
    ("grpc.max_reconnect_backoff_ms", 5_000),
)

#: record_outcomes sends up to this many rows per message, and fewer when the next row would take
#: a message past BULK_MESSAGE_BYTES (a row too big for that goes alone): 256 typical rows are about
#: 30 KiB. A server whose service.max_message_bytes is below BULK_MESSAGE_BYTES needs
#: record_outcomes(..., max_message_bytes=...) to match.
BULK_ROWS_PER_MESSAGE = 256
BULK_MESSAGE_BYTES = 256 * 1024

_BACKOFF_INITIAL = 0.05  # seconds before the first retry of an outcome
_BACKOFF_MAX = 1.0

#: How many predictions with an event_id the client keeps the inputs of (the oldest go first), so
#: that `record_outcome()` by event_id alone can send them when the service does not have them.
KEPT_PREDICTIONS = 4096


def _merge_options(
    defaults: Iterable[tuple[str, Any]], overrides: Mapping[str, Any] | Iterable[tuple[str, Any]] | None
) -> list[tuple[str, Any]]:
    merged = dict(defaults)
    if overrides is not None:
        merged.update(overrides.items() if isinstance(overrides, Mapping) else overrides)
    return list(merged.items())


def tls_credentials(
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files, for `FusionClient(credentials=...)`.

    ca_file: the CA bundle that signed the service's certificate (None: the system's roots).
    cert_file, key_file: this client's certificate and key, for a service that requires mutual
    TLS (`tls_client_ca_file`); both or neither.

    >>> tls_credentials(cert_file="client.pem")
    Traceback (most recent call last):
    ...
    ValueError: cert_file and key_file go together (mutual TLS): give both or neither
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together (mutual TLS): give both or neither")

    def read(path: str | os.PathLike[str] | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file), private_key=read(key_file), certificate_chain=read(cert_file)
    )


def _check_event_id(event_id: Any) -> str:
    """None -> "" (no event_id on the wire); an empty str is refused, as in-process: it would turn
    off de-duplication and retries without a word."""
    if event_id is None:
        return ""
    if not isinstance(event_id, str):
        raise TypeError(f"event_id must be a str or None, got {type(event_id).__name__}")
    if not event_id:
        raise ValueError("event_id must be a non-empty string, or None for no event_id")
    return event_id


def _check_timeout(timeout: Any) -> None:
    if timeout is not None and not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                    and 0 < timeout < math.inf):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")


def _add_inputs(request: pb.RecordOutcomeRequest, predicted: pb.PredictRequest) -> None:
    """The experts of the Predict, and its features unless the caller gave some."""
    request.experts.extend(predicted.experts)
    if not request.features:
        request.features.update(predicted.features)


def _bulk_direction(value: Any) -> int:
    """In a bulk stream a bad direction is the service's to reject, by row, naming the field."""
    try:
        return convert.to_direction(value)
    except ValueError:
        return pb.DIRECTION_UNSPECIFIED


class FusionClient:
    """A client of the titan-fusion service; a drop-in for the in-process `TransformerFusion`.

    Parameters
    ----------
    target
        "host:port" of the service.
    timeout
        Default deadline of every call, in seconds (per attempt).
    fallback
        Serve the local average of the experts' prob_up from `predict()`/`forward()` when the
        service is unreachable or too slow, instead of raising the `TransportError`.
    retries
        How many more times, at least, `record_outcome()`/`update()` try an outcome that has an
        event_id after UNAVAILABLE or DEADLINE_EXCEEDED, and for as long as
        `(retries + 1) * timeout` seconds allow; 0: never. Outcomes without an event_id are never
        retried.
    credentials
        `grpc.ChannelCredentials` for TLS, e.g. `tls_credentials(ca_file="ca.pem")` (add
        `cert_file=`/`key_file=` for mutual TLS); plaintext when None.
    token
        A bearer token, sent with every call as the metadata "authorization: Bearer <token>".
        Without `credentials` it travels in clear text.
    options
        gRPC channel options (a mapping or (key, value) pairs) that override `CHANNEL_OPTIONS`.

    The client owns its channel: use it as a context manager, or call `close()`. Once closed it
    refuses every call with `ClientClosedError`.

    >>> from titan_fusion.client import FusionClient
    >>> fusion = FusionClient("127.0.0.1:1", timeout=0.2)  # nothing listens on port 1
    >>> p = fusion.predict([{"prob_up": 0.2}, {"prob_up": 0.4}], event_id="BTC:15m:0")
    >>> round(p.prob_up, 9), p.source, p.reason, p.event_id
    (0.3, 'average', 'unavailable', 'BTC:15m:0')
    >>> fusion.close()
    >>> fusion.stats()
    Traceback (most recent call last):
    ...
    titan_fusion.client.errors.ClientClosedError: CANCELLED: the FusionClient is closed

    Against a running service (`titan-fusion serve`):

    >>> with FusionClient("localhost:50051") as fusion:  # doctest: +SKIP
    ...     p = fusion.predict(experts, {"close": 50000.0, "rsi": 55.0}, event_id="BTC:15m:1")
    ...     ack = fusion.record_outcome(actual_direction="UP", event_id="BTC:15m:1")
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = 1.0,
        fallback: bool = True,
        retries: int = 3,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        options: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
    ) -> None:
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self.target = target
        self.timeout = float(timeout)
        self.fallback = bool(fallback)
        self.retries = retries
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        channel_options = _merge_options(CHANNEL_OPTIONS, options)
        if credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        self._stub = pb_grpc.FusionServiceStub(self._channel)
        self._closed = False
        self._lock = threading.Lock()
        self._fallback_count = 0
        self._last: Prediction | None = None  # this client's last forecast (last_source, last_reason)
        # event_id -> (the Predict's request, served by the local fallback), oldest first
        self._kept: OrderedDict[str, tuple[pb.PredictRequest, bool]] = OrderedDict()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def fallback_count(self) -> int:
        """How many forecasts this client served locally because the service could not answer."""
        return self._fallback_count

    @property
    def last_source(self) -> str | None:
        """"fusion" or "average": what served this client's last forecast (predict or forward), as
        `TransformerFusion.last_source`; "average" with `last_reason` "unavailable" when it was this
        client's local fallback. None before the first."""
        return self._last.source if self._last is not None else None

    @property
    def last_reason(self) -> str | None:
        """Why the average served the last forecast ("unavailable": the local fallback; "warming_up",
        "underperforming", ...: the service's); None when the fusion served it."""
        return self._last.reason if self._last is not None else None

    @property
    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the channel. Calls in flight are cancelled; later calls raise ClientClosedError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._channel.close()

    def __enter__(self) -> FusionClient:
        if self._closed:
            raise ClientClosedError()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<FusionClient target={self.target!r} timeout={self.timeout} {state}>"

    # -- the one boundary between gRPC and the client's errors ---------------------------------

    def _invoke(
        self, method: str, request: Any, timeout: float | None, *, wait_for_ready: bool | None = None,
        none_means_no_deadline: bool = False,
    ) -> Any:
        if self._closed:
            raise ClientClosedError()
        _check_timeout(timeout)
        if timeout is None and not none_means_no_deadline:
            timeout = self.timeout
        rpc = getattr(self._stub, method)
        try:
            return rpc(
                request,
                timeout=timeout,
                metadata=self._metadata,
                wait_for_ready=wait_for_ready,
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err, closed=self._closed) from err
        except ValueError as err:  # gRPC refuses to start a call on a channel closed meanwhile
            if self._closed:
                raise ClientClosedError() from err
            raise

    # -- typed calls ----------------------------------------------------------------------------

    def predict(
        self,
        experts: Sequence[Any],
        features: Mapping[str, float] | None = None,
        *,
        event_id: str | None = None,
        timeout: float | None = None,
    ) -> Prediction:
        """The fused forecast for the next candle.

        `experts` are mappings or objects with `prob_up` and optionally `prob_down`,
        `confidence` and `name` (or `model_name`); `features` maps raw market feature names to
        values. With an `event_id` the service keeps these inputs, so that `record_outcome()` may
        later send only the event_id and the direction. Falls back to the local average when the
        service is unreachable and `fallback` is on (see the module's docstring).

        >>> with FusionClient("127.0.0.1:1", timeout=0.2) as fusion:
        ...     p = fusion.predict([{"name": "TrendVIC", "prob_up": 0.6},
        ...                         {"name": "Oscillator", "prob_up": 0.4}])
        >>> p.prob_up, p.source, p.reason, p.attention
        (0.5, 'average', 'unavailable', {'TrendVIC': 0.5, 'Oscillator': 0.5})
        """
        forecasts = convert.to_expert_forecasts(experts)
        request = pb.PredictRequest(
            experts=forecasts,
            features=convert.to_features(features),
            event_id=_check_event_id(event_id),
        )
        try:
            response = self._invoke("Predict", request, timeout)
        except TransportError as err:
            if not self.fallback:
                raise
            try:
                prediction = convert.local_average(forecasts, event_id=event_id)
            except ValueError as bad:
                raise ValueError(f"fusion service unreachable and no local average: {bad}") from err
            if request.event_id:
                self._keep(request, local=True)
            with self._lock:
                self._fallback_count += 1
                count = self._fallback_count
            logger.warning(
                "fusion service at %s did not answer (%s: %s); serving the local average of %d "
                "experts (fallback #%d)",
                self.target, err.code.name, err.details, len(forecasts), count,
            )
            self._last = prediction
            return prediction
        if request.event_id:
            self._keep(request, local=False)
        self._last = prediction = convert.prediction_from_proto(response)
        return prediction

    def _keep(self, request: pb.PredictRequest, *, local: bool) -> None:
        with self._lock:
            self._kept[request.event_id] = (request, local)  # a candle predicted again: the latest wins
            self._kept.move_to_end(request.event_id)
            while len(self._kept) > KEPT_PREDICTIONS:
                self._kept.popitem(last=False)

    def record_outcome(
        self,
        experts: Sequence[Any] | None = None,
        features: Mapping[str, float] | None = None,
        *,
        actual_direction: str,
        event_id: str | None = None,
        timeout: float | None = None,
    ) -> OutcomeAck:
        """Report how a candle closed ("UP" or "DOWN"); the service learns from it.

        Send the same experts and features as the candle's `predict()`, or only its `event_id`:
        the service then takes the inputs it kept from that Predict, or, for one served by the
        local fallback (or one the service answers NOT_FOUND for), this client sends the inputs it
        kept (the last KEPT_PREDICTIONS predictions with an event_id). With an event_id the call
        is idempotent and retried after UNAVAILABLE and DEADLINE_EXCEEDED (see the module's
        docstring); without one it is tried once, because a retry could train twice.

        >>> with FusionClient("127.0.0.1:1") as fusion:
        ...     fusion.record_outcome([{"prob_up": 0.6}], actual_direction="SIDEWAYS")
        Traceback (most recent call last):
        ...
        ValueError: actual_direction must be "UP" or "DOWN", got 'SIDEWAYS'
        """
        direction = convert.to_direction(actual_direction)
        forecasts = convert.to_expert_forecasts(experts) if experts is not None else []
        event_id = _check_event_id(event_id)
        if not forecasts and not event_id:
            raise ValueError(
                "record_outcome() needs the experts, or the event_id of an earlier predict()"
            )
        _check_timeout(timeout)
        request = pb.RecordOutcomeRequest(
            experts=forecasts,
            features=convert.to_features(features),
            event_id=event_id,
            actual_direction=direction,
        )
        with self._lock:
            kept = self._kept.get(event_id) if event_id and not forecasts else None
        if kept is not None and kept[1]:  # served by the local fallback: the service never saw it
            _add_inputs(request, kept[0])
        retries = self.retries if event_id else 0
        budget = (retries + 1) * (self.timeout if timeout is None else timeout)
        started = time.monotonic()
        delay = _BACKOFF_INITIAL
        attempt = 0
        while True:
            attempt += 1
            try:
                # A retry waits (within its deadline) for the channel to reconnect, instead of
                # failing at once during gRPC's reconnect backoff.
                response = self._invoke(
                    "RecordOutcome", request, timeout, wait_for_ready=True if attempt > 1 else None
                )
            except NotFoundError:
                if kept is None or request.experts:
                    raise
                # the service does not have that Predict's inputs any more: send this client's
                logger.warning("record_outcome(event_id=%r): the service does not have the Predict's inputs; "
                               "sending the ones this client kept", event_id)
                _add_inputs(request, kept[0])
                attempt -= 1
                continue
            except TransportError as err:
                if not retries or (attempt > retries and time.monotonic() - started + delay >= budget):
                    raise  # (retries is 0 without an event_id: a retry could train twice)
                logger.warning(
                    "record_outcome(event_id=%r) attempt %d failed (%s: %s); retrying in %.2f s",
                    event_id, attempt, err.code.name, err.details, delay,
                )
                time.sleep(delay)
                delay = min(2 * delay, _BACKOFF_MAX)
                continue
            if response.duplicate and attempt > 1:
                logger.info(
                    "record_outcome(event_id=%r): duplicate on attempt %d, so an earlier attempt "
                    "was recorded and its answer lost", event_id, attempt,
                )
            if event_id:
                with self._lock:
                    self._kept.pop(event_id, None)
            return convert.outcome_ack_from_proto(response, attempts=attempt)

    def record_outcomes(self, outcomes: Iterable[Mapping[str, Any]], *, timeout: float | None = 3600.0,
                        rows_per_message: int = BULK_ROWS_PER_MESSAGE,
                        max_message_bytes: int = BULK_MESSAGE_BYTES) -> BulkResult:
        """Bulk replay: stream many outcomes in one call (backtests, backfill).

        Each item is a mapping with "experts", "actual_direction", and optionally "features" and
        "event_id" (strongly recommended: it makes a re-run idempotent). The service journals them
        with RecordOutcome's guarantees and answers once all are journaled; training may trail the
        journal (`stats()["service"]["training_lag"]`). Rows the service refuses are reported by
        index, the others accepted. When the stream fails midway (a journal error, its deadline),
        no row after the failure is journaled, so a re-run journals the missing rows in file order.
        Not retried: re-run it with the same event_ids instead
        (duplicates are acknowledged, not learned twice, as far back as the service's
        `journal_keep_outcomes` plus `journal_keep_event_ids`: 10,100,000 outcomes by default).
        `timeout` bounds the whole stream (default one hour; None: no deadline).

        The rows travel up to `rows_per_message` to a message and under `max_message_bytes`
        (RecordOutcomeBatches, which needs a server of this version or later: an older one gets
        an error that says so). An item this client cannot convert (say, an event_id that is not a
        str) ends the stream there: the rows before it are sent and journaled, and its error is
        raised after the service has answered for them.
        """
        if rows_per_message < 1 or max_message_bytes < 1:
            raise ValueError("rows_per_message and max_message_bytes must be >= 1")
        failed: list[Exception] = []

        def batches() -> Iterable[pb.RecordOutcomeBatch]:
            batch, size = pb.RecordOutcomeBatch(), 0
            try:
                for item in outcomes:
                    experts = item.get("experts")
                    row = pb.RecordOutcomeRequest(
                        experts=convert.to_expert_forecasts(experts) if experts else [],
                        features=convert.to_features(item.get("features")),
                        event_id=_check_event_id(item.get("event_id")),
                        actual_direction=_bulk_direction(item.get("actual_direction")))
                    row_size = row.ByteSize() + 6  # with its tag and length in the batch (at most 6 bytes)
                    if batch.outcomes and (len(batch.outcomes) >= rows_per_message
                                           or size + row_size > max_message_bytes):
                        yield batch
                        batch, size = pb.RecordOutcomeBatch(), 0
                    batch.outcomes.append(row)
                    size += row_size
            except Exception as e:  # raised below, once the service has answered for the rows before
                failed.append(e)
            if batch.outcomes:
                yield batch

        try:
            response = self._invoke("RecordOutcomeBatches", batches(), timeout, none_means_no_deadline=True)
        except ServerError as e:
            if e.code is grpc.StatusCode.UNIMPLEMENTED:
                raise ServerError("the service does not implement RecordOutcomeBatches: it is older than "
                                  "this client; upgrade it (or stream RecordOutcomes yourself)",
                                  code=e.code) from e
            raise
        result = convert.bulk_result_from_proto(response)
        if failed:
            failed[0].add_note(f"record_outcomes: the stream ended at this item; the {result.accepted} rows "
                               f"accepted before it are journaled ({result.duplicates} duplicates, "
                               f"{result.rejected} rejected)")
            raise failed[0]
        return result

    def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Training statistics, attention weights and the service's counters, as one dict.

        Every `TrainingStats` field by name (`samples_trained`, `train_loss`, `val_loss`,
        `current_lr`, `is_overfitting`, `avg_attention_entropy`, ...; `last_source` and
        `last_reason` as "fusion"/"average" and None/"warming_up"/...), plus "attention"
        (expert name -> weight) and "service" (the `ServiceStats` fields).

        >>> with FusionClient("localhost:50051") as fusion:  # doctest: +SKIP
        ...     fusion.stats()["samples_trained"]
        1152
        """
        return convert.stats_from_proto(self._invoke("Stats", pb.StatsRequest(), timeout))

    def _checkpoint(self, action: int, name: str, timeout: float | None) -> list[CheckpointInfo]:
        response = self._invoke("Checkpoint", pb.CheckpointRequest(action=action, name=name), timeout)
        return [convert.checkpoint_from_proto(info) for info in response.checkpoints]

    def _one_checkpoint(self, action: int, name: str, timeout: float | None) -> CheckpointInfo:
        checkpoints = self._checkpoint(action, name, timeout)
        if not checkpoints:
            raise ServerError(
                f"the service answered Checkpoint({pb.CheckpointRequest.Action.Name(action)}) "
                "without a checkpoint", code=grpc.StatusCode.UNKNOWN,
            )
        return checkpoints[0]

    def checkpoint_save(self, name: str | None = None, *, timeout: float | None = None) -> CheckpointInfo:
        """Save the service's model as checkpoint `name` (default "step-<train_steps>").

        A plain name, never a path: ASCII letters, digits, '.', '_' and '-', at most 64
        characters, the first a letter, digit or '_' (not '.' or '-'), and not starting with
        "auto-" (reserved for the service's automatic checkpoints). Checkpoints live in the
        service's data directory; the service refuses any other name with INVALID_ARGUMENT.

        >>> with FusionClient("localhost:50051") as fusion:  # doctest: +SKIP
        ...     fusion.checkpoint_save("before-fomc").name
        'before-fomc'
        """
        return self._one_checkpoint(pb.CheckpointRequest.ACTION_SAVE, name or "", timeout)

    def checkpoint_restore(self, name: str, *, timeout: float | None = None) -> CheckpointInfo:
        """Replace the service's serving model with checkpoint `name`."""
        if not name:
            raise ValueError("checkpoint_restore() needs the checkpoint's name")
        return self._one_checkpoint(pb.CheckpointRequest.ACTION_RESTORE, name, timeout)

    def checkpoint_list(self, *, timeout: float | None = None) -> list[CheckpointInfo]:
        """The service's checkpoints, newest first."""
        return self._checkpoint(pb.CheckpointRequest.ACTION_LIST, "", timeout)

    # -- the in-process TransformerFusion's API -------------------------------------------------

    def forward(
        self,
        model_outputs: Sequence[Any],
        features: Mapping[str, float] | None = None,
        *,
        event_id: str | None = None,
    ) -> tuple[float, float]:
        """`(prob_up, prob_down)` for the next candle, like `TransformerFusion.forward()`.

        >>> with FusionClient("127.0.0.1:1", timeout=0.2) as fusion:
        ...     fusion.forward([{"prob_up": 0.75}, {"prob_up": 0.25}], {"close": 50000.0})
        (0.5, 0.5)
        """
        prediction = self.predict(model_outputs, features, event_id=event_id)
        return prediction.prob_up, prediction.prob_down

    def update(
        self,
        model_outputs: Sequence[Any],
        features: Mapping[str, float] | None = None,
        actual_direction: str = "UP",
        *,
        event_id: str | None = None,
    ) -> None:
        """Learn how a candle closed, like `TransformerFusion.update()`.

        Pass the candle's `event_id` (the one given to `forward()`): it makes the call safe to
        retry, and it is retried; without one a transport error is raised at once.
        """
        self.record_outcome(
            model_outputs, features, actual_direction=actual_direction, event_id=event_id
        )

    def get_training_stats(self) -> dict[str, Any]:
        """The same dict as `stats()`: `TransformerFusion.get_training_stats()`'s keys and more."""
        return self.stats()

    def get_attention_weights(self) -> dict[str, float]:
        """Expert name -> attention weight, averaged by the service over recent fused forecasts."""
        return self.stats()["attention"]

    def save(self, path: str | os.PathLike[str]) -> CheckpointInfo:
        """`checkpoint_save(name=path)`: `path` is a checkpoint name on the service, not a path."""
        return self.checkpoint_save(name=os.fspath(path))

    def load(self, path: str | os.PathLike[str]) -> CheckpointInfo:
        """`checkpoint_restore(path)`: `path` is a checkpoint name on the service, not a path."""
        return self.checkpoint_restore(os.fspath(path))
