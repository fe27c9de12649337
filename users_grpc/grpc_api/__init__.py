"""The gRPC edge: the servicer, its conversions, the error-to-status table, access rules and interceptors.

It calls services and reaches adapters only through the composition root (bootstrap.py);
see docs/architecture.md.
"""
