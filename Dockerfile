# syntax=docker/dockerfile:1
FROM python:3.13-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY users_grpc users_grpc
COPY generated generated
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.13-slim
RUN useradd --system --uid 10001 users
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENV USERS_GRPC_ADDRESS=[::]:50051 \
    USERS_SHUTDOWN_DELAY_SECONDS=5 \
    USERS_SHUTDOWN_GRACE_SECONDS=20 \
    PYTHONUNBUFFERED=1
EXPOSE 50051
# Kubernetes: use a grpc probe (or grpc-health-probe) on port 50051, service "users.v1.UserService".
ENTRYPOINT ["users-grpc"]
CMD ["serve"]
