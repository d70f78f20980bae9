# The dashboard and the one-shot migrate/bootstrap service: no torch, no transformers.
# Build: docker build -f docker/Dockerfile.app -t adapterlens-app .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ADAPTERLENS_DATA_DIR=/data

WORKDIR /opt/adapterlens
# Dependencies first (cached while only the code changes): the base package's, never the ml extra.
COPY pyproject.toml README.md* ./
RUN python -c "import tomllib; p = tomllib.load(open(\"pyproject.toml\", \"rb\"))[\"project\"]; print(chr(10).join(p[\"dependencies\"]))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY . .
# Editable, so templates/, static/ and migrations/ are found beside the packages (as in a clone).
RUN pip install --no-deps -e . \
    && python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'the app image must not carry torch'" \
    && useradd --create-home --uid 1000 adapterlens && mkdir -p /data && chown adapterlens /data
USER adapterlens
EXPOSE 8000
CMD ["adapterlens", "serve", "--host", "0.0.0.0", "--port", "8000"]
