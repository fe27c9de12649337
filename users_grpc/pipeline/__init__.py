"""The one call pipeline of both edges, edge-neutral: tracing, the call's log line and metrics, the
guard (parse, ranges, readiness, the concurrency caps, the caller and its access rule, the
per-source rate limits, the database budget) and the audit trail, written against a :class:`Call`
and raising domain errors. The gRPC interceptor (grpc_api/interceptors.py) and the HTTP edge
(http_api/invoke.py) each turn their call into a :class:`Call`, run :class:`Pipeline`, and map a
domain error to a status by the one table (grpc_api/status.py). Nothing here imports gRPC or the
generated code (an import-linter contract holds it)."""
