#!/usr/bin/env bash
# The GPU figures in one run (about 5 minutes on one GPU): for tf_efficientnet_lite0 (real weights) and a
# ViT-B/16 (random weights: speed only), the bare forward pass against `extract` end to end at AMP, per
# decode path (pil, turbo, nvjpeg), with the cost per image that names the limiting stage; then the
# linear probe on 50,000 x 1,280 generated features (torch-logreg on the GPU against scikit-learn).
#
#   PIPELINE_WEIGHTS_DIR=../shared/weights bash benchmarks/gpu_check.sh
#
# GPU_CHECK_DEVICE=cpu GPU_CHECK_IMAGES=64 GPU_CHECK_PROBE_N=2000 runs the same steps small on a CPU
# (a check that the script works, not figures).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
IMAGES=${GPU_CHECK_IMAGES:-2048}
PROBE_N=${GPU_CHECK_PROBE_N:-50000}
VIT=vit_base_patch16_224.augreg2_in21k_ft_in1k
: "${PIPELINE_WEIGHTS_DIR:?set PIPELINE_WEIGHTS_DIR to the folder with tf_efficientnet_lite0.in1k.safetensors}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/weights"
ln -s "$(cd "$PIPELINE_WEIGHTS_DIR" && pwd)/tf_efficientnet_lite0.in1k.safetensors" "$work/weights/"
"$PY" - "$work/weights/$VIT.safetensors" "$VIT" <<'EOF'
import sys, timm
from safetensors.torch import save_file
save_file(timm.create_model(sys.argv[2], pretrained=False).state_dict(), sys.argv[1])
EOF
export PIPELINE_WEIGHTS_DIR="$work/weights"

"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device'); print('torch', torch.__version__)"
for backbone in tf_efficientnet_lite0.in1k "$VIT"; do
  for decode in pil turbo nvjpeg; do
    if [ "$decode" = nvjpeg ] && [ "$DEVICE" != cuda ]; then continue; fi
    echo "== $backbone, --decode $decode"
    "$PY" benchmarks/extract_throughput.py --backbone "$backbone" --device "$DEVICE" --images "$IMAGES" \
      --batch-size 128 --repeats 2 --decode "$decode"
  done
done
echo "== linear probe, $PROBE_N x 1280 features, 100 classes"
"$PY" benchmarks/linear_probe.py --n "$PROBE_N" --n-test $((PROBE_N / 5)) --dim 1280 --classes 100
