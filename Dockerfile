# syntax=docker/dockerfile:1
FROM python:3.13-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY users_grpc users_grpc
COPY generated generated
COPY clients/python clients/python
# Wheels of the server, its client package (from clients/python, which links generated/users) and
# every dependency.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.13-slim
# Its own group: Debian already has a group named "users" (gid 100), so `useradd users` fails.
RUN groupadd --gid 10001 users-grpc \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin users-grpc
COPY --from=build /wheels /wheels
# --no-deps: /wheels holds every dependency, and the server names its client by a path of the build
# stage; pip check proves nothing is missing.
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && pip check && rm -rf /wheels
USER 10001
ENV USERS_GRPC_ADDRESS=[::]:50051 \
    USERS_SHUTDOWN_DELAY_SECONDS=5 \
    USERS_SHUTDOWN_GRACE_SECONDS=20 \
    PYTHONUNBUFFERED=1
EXPOSE 50051
# Kubernetes: deploy/kubernetes/ (readiness probe on "users.v1.UserService", liveness on "liveness").
ENTRYPOINT ["users-grpc"]
CMD ["serve"]
