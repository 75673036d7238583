# USAE Concept Explorer: the web app, the CLI and the offline demo backbones.
# CPU by default; the `gpu` compose profile runs the same image with the NVIDIA runtime
# (PyTorch wheels from PyPI carry their own CUDA libraries).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    USAE_DATA_DIR=/data
WORKDIR /srv/usae

COPY pyproject.toml README.md ./
COPY usae_core ./usae_core
COPY app ./app
COPY templates ./templates
COPY static ./static
COPY scripts ./scripts
RUN USAE_SKIP_APT=1 USAE_SKIP_TEST_EXTRA=1 bash scripts/install.sh

VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["usae", "serve", "--host", "0.0.0.0", "--port", "8000"]
