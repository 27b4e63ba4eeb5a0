# One image for `vigie serve` and `vigie ledger`.
#   docker build -t vigie:dev .
# Build with the Rust toolchain, run on a minimal base as a non-root user.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# The example plugins are WebAssembly components (wasm32-wasip2); the
# policies' plugins.toml finds them at ../plugins/dist.
RUN rustup target add wasm32-wasip2 \
 && CARGO_TARGET_DIR=/src/target ./scripts/build-plugins \
 && cargo build --profile dist --locked -p vigie \
 && strip target/dist/vigie \
 && mkdir -p /out/var/lib/vigie /out/var/lib/vigie-ledger

# distroless/cc: glibc and libgcc only, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/dist/vigie /usr/local/bin/vigie
COPY --from=build /src/policies /etc/vigie/policies
COPY --from=build /src/plugins/dist /etc/vigie/plugins/dist
COPY --from=build /src/docs/envoy/vigie.toml /etc/vigie/ext_authz.toml
# Data directories owned by the runtime user (named volumes inherit this).
COPY --from=build --chown=65532:65532 /out/var/lib /var/lib
USER nonroot:nonroot
WORKDIR /var/lib/vigie
EXPOSE 8190 8290 9191
ENTRYPOINT ["/usr/local/bin/vigie"]
CMD ["serve", "--policies", "/etc/vigie/policies", "--data-dir", "/var/lib/vigie"]
