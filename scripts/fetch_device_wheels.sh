#!/usr/bin/env bash
# Download the exact wheels worker-orcd needs on the GPU machine, whose image
# has torch/triton/numpy/tokenizers/httpx/prometheus_client but lacks the web
# and crypto stack, and has no network. Output: .whl/ (git-ignored), carried
# with the device tool's `carry: [".whl"]` and installed there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 pydantic-core==2.50.4
  annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7
  uvicorn==0.54.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 gguf==0.19.0
  opentelemetry-api==1.45.2
  llguidance==1.9.1 openai==3.57.0 jiter==0.19.0 sniffio==1.3.1 jsonschema==4.26.0 referencing==0.37.0
  rpds-py==2026.9.1 jsonschema-specifications==2025.9.1 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
  pytest-xdist==3.8.0 execnet==2.1.2 uvloop==0.23.0
)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 -d .whl "${PKGS[@]}"
ls -la .whl
