# leafgate gateway as an Azure IoT Edge custom module (also runs standalone).
# Multi-stage: native modules (better-sqlite3) build in the first stage, the runtime stage
# carries no compiler and runs as an unprivileged user.
FROM node:20-bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY package.json package-lock.json tsconfig.json tsconfig.build.json ./
RUN npm ci --no-audit --no-fund
COPY protocol ./protocol
COPY config-schema ./config-schema
COPY broker ./broker
COPY plugins ./plugins
COPY cloud-bridge ./cloud-bridge
COPY gateway ./gateway
COPY authority ./authority
COPY device ./device
COPY bin ./bin
COPY test/support/iothub-standin.ts ./test/support/iothub-standin.ts
COPY test/support/iothub-standin ./test/support/iothub-standin
# Compile to dist/ (tsc rewrites the .ts import extensions), then drop every dev dependency
# (tsx, typescript, types): the runtime stage runs `node bin/leafgate.js` on dist/ alone.
RUN npm run build \
 && npm prune --omit=dev --no-audit --no-fund \
 && mkdir /out \
 && cp -r package.json node_modules dist /out/ \
 && mkdir /out/bin && cp bin/leafgate.js bin/leafgate-gateway /out/bin/

FROM node:20-bookworm-slim
ENV NODE_ENV=production \
    LEAFGATE_GATEWAY_DATA=/var/lib/leafgate/gateway \
    LEAFGATE_GATEWAY_PORT=8883 \
    LEAFGATE_GATEWAY_HTTP_PORT=9464
# jemalloc: bin/leafgate-gateway preloads it (2-3 kB less RSS per idle device connection
# than glibc malloc; README, "Many devices on one gateway").
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 leafgate \
 && useradd --system --uid 10001 --gid leafgate --home /var/lib/leafgate --shell /usr/sbin/nologin leafgate \
 && mkdir -p /var/lib/leafgate/gateway && chown -R leafgate:leafgate /var/lib/leafgate
WORKDIR /app
COPY --from=build --chown=root:root /out /app
USER leafgate
VOLUME ["/var/lib/leafgate"]
EXPOSE 8883 9464
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
  CMD node -e "fetch('http://127.0.0.1:'+(process.env.LEAFGATE_GATEWAY_HTTP_PORT||9464)+'/healthz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"
# The production start (also what the connections benchmark runs): raises the open-files
# soft limit to the hard one (one descriptor per device; give the container a hard limit
# above the device count: --ulimit nofile=65536:65536), preloads jemalloc, then
# `leafgate gateway <command>`.
ENTRYPOINT ["bin/leafgate-gateway"]
CMD ["start"]
