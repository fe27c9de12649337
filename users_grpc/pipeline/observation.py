"""What an operator sees of each call: one log line and the metrics when it ends, however it ends.

This step observes; it decides nothing. It runs outside the guard, so it sees refusals too, and
learns who called and why a call was refused through :data:`~users_grpc.pipeline.current.current_call`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from users_grpc.domain.errors import UsersError
from users_grpc.pipeline.call import Call, Code, code_of
from users_grpc.pipeline.current import CallRecord, current_call

log = logging.getLogger("users_grpc.calls")


class Gauge(Protocol):
    def inc(self) -> None: ...

    def dec(self) -> None: ...


class CallMetrics(Protocol):
    """The call metrics (grpc_api/observability.py's Metrics)."""

    @property
    def in_progress(self) -> Gauge: ...

    def observe(self, method: str, code: str, seconds: float | None, reason: str | None) -> None: ...


class Observer:
    """One log line and the metrics of every UserService call, with its request id."""

    def __init__(
        self, *, metrics: CallMetrics | None, status_of: Callable[[UsersError], Code], trace_ids: bool = False
    ) -> None:
        self._metrics = metrics
        self._status_of = status_of
        self._trace_ids = trace_ids

    @contextlib.contextmanager
    def observed(self, call: Call) -> Iterator[None]:
        started = time.perf_counter()
        record = CallRecord()
        token = current_call.set(record)
        metrics = self._metrics
        # Unary calls only: USERS_MAX_CONCURRENT_RPCS, which in_progress is read against, does not
        # count streams (the guard counts those; the streams_open gauge reads it).
        if metrics is not None and not call.stream:
            metrics.in_progress.inc()
        code = Code.OK
        try:
            yield
        except BaseException as error:
            code = code_of(error, self._status_of)
            raise
        finally:
            seconds = time.perf_counter() - started
            if not call.stream:
                # A stream closed from outside ends in another context, where the reset would fail;
                # each stream runs in a task of its own, whose context copy ends with it anyway.
                current_call.reset(token)
            if metrics is not None:
                if not call.stream:
                    metrics.in_progress.dec()
                # A stream's duration is how long its client watched, not a latency: kept out of
                # the histogram, where it would fill the top bucket.
                metrics.observe(call.name, code.name, None if call.stream else seconds, record.reason)
            if log.isEnabledFor(logging.INFO):
                self._log(call, code, seconds, record)

    def _log(self, call: Call, code: Code, seconds: float, record: CallRecord) -> None:
        fields: dict[str, object] = {
            "rpc": call.method,
            "code": code.name,
            "duration_ms": round(seconds * 1000, 2),
            "peer": call.peer,
            "request_id": call.request_id,
        }
        if record.reason is not None:
            fields["reason"] = record.reason
        caller = record.caller
        if caller is not None:
            # The same names the caller's other lines carry (logs.CallerContext).
            for key, value in (
                ("source", caller.source),
                ("caller_user_id", caller.user_id),
                ("caller_session_id", caller.session_id),
                ("machine", caller.machine),
            ):
                if value:
                    fields[key] = value
        if self._trace_ids:
            from opentelemetry import trace  # only imported when tracing is on

            span_context = trace.get_current_span().get_span_context()
            if span_context.is_valid:
                fields["trace_id"] = format(span_context.trace_id, "032x")
        log.info("rpc", extra=fields)
