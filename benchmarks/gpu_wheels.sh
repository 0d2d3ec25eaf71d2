#!/usr/bin/env bash
# Download the small pure-Python/cp312 wheels a CUDA machine without network needs to run
# benchmarks/gpu_check.sh (it has torch, transformers, peft, accelerate, safetensors, numpy,
# scipy, matplotlib, click, rich, pyyaml; not pydantic, cma, nevergrad or pytest).
# Writes .whl/ at the repository root (git-ignored; carry it to the machine) and prints the
# total size (must stay well under 60 MiB). Versions are the ones the tests run with here.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
PKGS=(
  # configs
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  # optimizers: cma; nevergrad and what it imports (bayes_opt -> scikit-learn, pandas)
  cma==4.5.0 nevergrad==1.0.12 bayesian-optimization==1.4.0 directsearch pandas==3.1.1
  python-dateutil six scikit-learn==1.9.1 joblib threadpoolctl narwhals
  # tests
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging pygments
)
rc=0
for p in "${PKGS[@]}"; do
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$p"; then
    echo "FAILED: $p" >&2
    rc=1
  fi
done
ls -1 .whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "wheels: $(ls .whl/*.whl | wc -l) files, $((total / 1048576)) MiB (limit: well under 60 MiB)"
exit $rc
