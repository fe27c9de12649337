"""users-grpc: user accounts over gRPC (``users.v1.UserService``) on MongoDB.

The layers, outside in::

    servicer.py      gRPC requests -> service calls -> gRPC replies
    interceptors.py  domain errors -> gRPC statuses, deadlines -> database timeouts
    service.py       the account lifecycle, on domain types and ports only
    domain.py        types and rules;  errors.py: the error tree
    ports.py         what the service needs: repository, mailer, hasher, clock
    mongo/           PyMongo (BSON stays there);  mail.py, passwords.py: other adapters
    bootstrap.py     the composition root;  config.py: USERS_* settings
"""

__all__: list[str] = []
