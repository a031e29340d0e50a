#!/usr/bin/env bash
# The whole pipeline on a tiny synthetic HealthGPT-M3 (random weights, the release file layout), on CPU, offline:
# synthesize a checkpoint, export it to a bundle, verify it against PyTorch, ask about a real CT scan, reconstruct it.
# Everything it writes goes under demo/ (git-ignored). Random weights answer gibberish; the point is the plumbing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=demo
mkdir -p "$OUT"

echo "== 1/5 synthesize a tiny M3 checkpoint (release layout) =="
$PY build.py synth --variant m3 --size tiny --out "$OUT/checkpoint"

echo "== 2/5 export it to a bundle (per-task ONNX graphs + manifest) =="
$PY build.py export --checkpoint "$OUT/checkpoint" --out "$OUT/bundle"
$PY -m runtime info --bundle "$OUT/bundle"

echo "== 3/5 verify the bundle against the PyTorch reference (parity report; GPU backends: not run here) =="
# One torch thread: the tiny reference model is overhead-bound (a second thread only waits).
OMP_NUM_THREADS=1 $PY build.py verify --bundle "$OUT/bundle" --checkpoint "$OUT/checkpoint"

# A real CT slice that ships inside the pydicom wheel (never downloaded).
SCAN=$($PY -c 'from pydicom.data import get_testdata_file; print(get_testdata_file("CT_small.dcm", download=False))')

echo "== 4/5 ask a question about $SCAN (the answer streams below) =="
$PY -m runtime ask --bundle "$OUT/bundle" --image "$SCAN" --max-new-tokens 32 \
    "What abnormality is visible in this CT scan?"

echo "== 5/5 reconstruct the scan (1024 image tokens -> VQGAN -> PNG) =="
$PY -m runtime generate --bundle "$OUT/bundle" --image "$SCAN" --constrain-image-tokens \
    "Reconstruct the image." --out "$OUT/reconstruction.png"

echo
echo "artifacts:"
echo "  checkpoint      $OUT/checkpoint"
echo "  bundle          $OUT/bundle"
echo "  parity report   $OUT/bundle/parity.md"
echo "  reconstruction  $OUT/reconstruction.png"
