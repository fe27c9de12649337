"""OpenTelemetry traces: a server span per call (the pipeline's, pipeline/tracing.py, on both edges),
a client span per database command beneath it.

Switched on by the standard variables only: ``OTEL_TRACES_EXPORTER`` (other than ``none``), or an
OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, which
mean the ``otlp`` exporter). ``OTEL_SDK_DISABLED=true`` switches it off whatever else is set. Off,
nothing of OpenTelemetry is even imported: the pipeline has no span step and the database
client no command listener. The OTLP exporters are the optional extra ``users-grpc[otlp]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from users_grpc.domain.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from pymongo.monitoring import CommandListener

SERVICE_NAME = "users-grpc"


def tracing_switched_on(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def tracer_provider_from_env(environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A tracer provider exporting as the ``OTEL_*`` variables say, or None when tracing is off.

    The SDK itself reads the rest: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``, the
    exporters' ``OTEL_EXPORTER_OTLP_*``, the batching ``OTEL_BSP_*``, the sampler ``OTEL_TRACES_SAMPLER``.
    """
    environ = os.environ if environ is None else environ
    if not tracing_switched_on(environ):
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource.create({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    names = [name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",") if name.strip()]
    for name in names:
        if name == "none":
            continue
        [*found] = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER={name}: no such span exporter is installed"
                + ("; the OTLP exporters come with `pip install 'users-grpc[otlp]'`" if name.startswith("otlp") else "")
            )
        provider.add_span_processor(BatchSpanProcessor(found[0].load()()))
    return provider


def command_listener(provider: TracerProvider) -> CommandListener:
    """Opens a client span for each database command, beneath the span current when it is sent.

    PyMongo's async client calls its command listeners in the task that sent the command, so the
    call's span is the parent. Only the command's name is recorded, never its documents.
    """
    from opentelemetry import trace
    from opentelemetry.instrumentation.pymongo import CommandTracer

    listener: Any = CommandTracer(trace.get_tracer("users_grpc.adapters.mongo", tracer_provider=provider))
    result: CommandListener = listener
    return result
