# One image for every Barber service: `python -m <service>` (see compose.yml).
# Build: docker build -t barber .   Run: docker run barber python -m gateway

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# -- build: a virtualenv with the dependencies, pinned by constraints.txt ------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Only the metadata: the dependency layer is rebuilt when they change, not the code.
COPY pyproject.toml constraints.txt ./
# The dependencies come from pyproject.toml itself; every version from constraints.txt
# (`python -m deploy.constraints`). Wheels only: this stage has no compiler either.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && /opt/venv/bin/pip install --only-binary=:all: -r requirements.txt -c constraints.txt

# -- run -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0
# A fixed uid/gid, so volumes (keys) keep their owner across rebuilds. The key folders
# exist in the image with their owner and mode, which new named volumes mounted there
# inherit.
RUN groupadd --system --gid 10001 barber \
    && useradd --system --uid 10001 --gid barber --home-dir /app --no-create-home --shell /usr/sbin/nologin barber \
    && install -d -o barber -g barber -m 0755 /var/lib/barber/keys \
    && install -d -o barber -g barber -m 0700 /var/lib/barber/signing
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root . /app
USER 10001:10001
EXPOSE 8000 8101 8201 8300 8500
# PORT is set per service (compose.yml); the script tries every service's status path.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "deploy.healthcheck"]
# Exec form throughout: the service is PID 1 and gets SIGTERM itself (it deregisters and
# drains in-flight requests within SHUTDOWN_GRACE_S).
ENTRYPOINT ["/bin/sh", "/app/deploy/entrypoint.sh"]
CMD ["python", "-m", "gateway"]
