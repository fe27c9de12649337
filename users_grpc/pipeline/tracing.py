"""A server span for each call, continuing the caller's trace (its ``traceparent`` header), on
either edge; the database spans (grpc_api/tracing.py's command listener) fall beneath it. Only
built when tracing is switched on (grpc_api/tracing.py reads the OTEL_* switches)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from users_grpc.domain.errors import UsersError
from users_grpc.pipeline.call import Call, Code, code_of

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


class CallSpans:
    def __init__(self, provider: TracerProvider, status_of: Callable[[UsersError], Code]) -> None:
        from opentelemetry import trace

        self._tracer = trace.get_tracer("users_grpc.pipeline", tracer_provider=provider)
        self._status_of = status_of

    @contextlib.contextmanager
    def span(self, call: Call) -> Iterator[None]:
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        carrier = {key: value for key, value in call.metadata if isinstance(value, str)}
        service, _, method = call.method.strip("/").partition("/")
        with self._tracer.start_as_current_span(
            call.method,
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
            # A refusal is an answer, not a crash: its status code says what it was, with no traceback.
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            code = Code.OK
            try:
                yield
            except BaseException as error:
                code = code_of(error, self._status_of)
                raise
            finally:
                span.set_attribute("rpc.grpc.status_code", int(code))
                if code is not Code.OK:
                    span.set_status(Status(StatusCode.ERROR, code.name))
