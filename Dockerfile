# syntax=docker/dockerfile:1
# The runyard server image. Two stages: wheels are built with compilers in the first, and only the
# installed virtual environment and the runtime libraries reach the second. Build it from the checkout:
#   docker build -t registry.example.com/runyard:$(git describe --tags) .
# In Kubernetes (`runyard deploy kubernetes`) the server binds to loopback and an NGINX sidecar, configured
# by `runyard nginx render --container`, is the only way in.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# gssapi (Kerberos for HDFS) compiles against libkrb5; nothing else here needs a compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libkrb5-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/runyard
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server server
COPY toolkit toolkit
COPY migrations migrations
COPY infra infra
COPY nginx nginx
# Every store's SDK and every database driver: one image serves any backend and artifact store.
RUN /opt/runyard/bin/pip install ".[mssql,azure,gcs,kerberos,kubernetes]"

FROM ${PYTHON_IMAGE}
# Runtime libraries only: Kerberos for gssapi, and the dump tools `runyard db backup|upgrade` drive.
# PostgreSQL's client comes from PGDG (its key ships in postgresql-common) because pg_dump must be at
# least as new as the server it dumps, and Debian 12 stops at 15.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-common libgssapi-krb5-2 \
      libkrb5-3 mariadb-client tini \
 && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y \
 && apt-get install -y --no-install-recommends postgresql-client-17 \
 && rm -rf /var/lib/apt/lists/*
# A fixed numeric id, so Kubernetes can prove runAsNonRoot without looking the name up.
RUN groupadd --system --gid 10001 runyard \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin runyard
COPY --from=build /opt/runyard /opt/runyard
ENV PATH=/opt/runyard/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 5000
# tini reaps the worker processes and forwards SIGTERM, so a rollout drains instead of being killed.
ENTRYPOINT ["tini", "--", "runyard"]
# Loopback by default, as everywhere: `docker run … server --host 0.0.0.0` opens it deliberately.
CMD ["server"]
