"""What the tests share: the components they start (FerretDB, the SMTP sink, servers on port 0,
the stores), the fakes of the service's ports, certificates, and helpers for calling the server.

Test modules import from here, never from one another; the fixtures are registered by
tests/conftest.py (``pytest_plugins``), so every test folder has them all under the same names.
"""
