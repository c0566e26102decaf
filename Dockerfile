FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p switchyard

FROM debian:bookworm-slim AS base
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY config /etc/switchyard
EXPOSE 8080 9090
ENTRYPOINT ["switchyard"]

# Switchyard with Python and AWS's Lambda runtime interface client, running the
# example handler as a `lambda` function (docker compose's `switchyard-lambda`).
FROM base AS lambda-python
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/lambda-python \
    && /opt/lambda-python/bin/pip install --no-cache-dir awslambdaric==4.2.2
COPY examples /srv/functions
ENV LAMBDA_PYTHON=/opt/lambda-python/bin/python LAMBDA_FUNCTIONS=/srv/functions
CMD ["run", "--config", "/etc/switchyard/lambda-python.toml"]

FROM base
CMD ["run", "--config", "/etc/switchyard/docker.toml"]
