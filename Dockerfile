FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p switchyard

FROM debian:bookworm-slim
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY config /etc/switchyard
EXPOSE 8080 9090
ENTRYPOINT ["switchyard"]
CMD ["run", "--config", "/etc/switchyard/docker.toml"]
