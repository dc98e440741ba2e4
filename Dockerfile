# The dmlsys image: one node process per container (python -m dmlsys.cluster node ...), as the
# manifests of `python -m dmlsys.cluster k8s SPEC` run it. Build from the repository root:
#     docker build -t dmlsys:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    JAX_PLATFORMS=cpu HOME=/home/dmlsys

WORKDIR /opt/dmlsys
# Dependencies first: a code change does not reinstall jax.
COPY pyproject.toml README.md ./
RUN mkdir dmlsys && touch dmlsys/__init__.py && pip install . && pip uninstall -y dmlsys && rm -rf dmlsys build
COPY dmlsys ./dmlsys
RUN pip install --no-deps .

# The user the manifests run as (dmlsys/cluster/k8s.py USER); its state, store and cache
# directories are volumes mounted there.
RUN groupadd --gid 10001 dmlsys && useradd --uid 10001 --gid 10001 --create-home dmlsys \
    && install -d -o 10001 -g 10001 /var/lib/dmlsys /var/lib/dmlsys-store /var/cache/dmlsys
USER 10001

EXPOSE 7000 9000 8000
CMD ["python", "-m", "dmlsys.cluster", "--help"]
