"""SCIM 2.0 (RFC 7643, 7644) at /scim/v2: an HTTP edge that translates.

Each SCIM request becomes the equivalent UserService call(s), made through the HTTP edge's
:data:`~users_grpc.http_api.invoke.Invoke`, so access rules, throttles, audit events, the change
feed and notices are exactly the RPCs'; docs/scim.md has the mapping.
"""
