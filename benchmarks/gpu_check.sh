#!/usr/bin/env bash
# The GPU check: clipcl bench for ViT-B-16 (er, gdro) at 224 px in bf16, a 2-rank DDP smoke test on the one
# GPU, and a short imagefolder run at 224 px, on synthetic images. At most about 8 minutes. Figures go to
# OUT (default benchmarks/results): gpu_bench_er.json, gpu_bench_gdro.json, gpu_check.md.
#
# A GPU machine without network has torch but not open_clip; fetch its wheels here first and carry them:
#   .venv/bin/python -m pip download --no-deps -d .gpu_wheels open_clip_torch ftfy wcwidth
#   bash benchmarks/gpu_check.sh "$OUT"
# On a CPU it runs as a dry run of the same steps with a tiny model: MODEL=clipcl-tiny-vit SIZE=32 DEVICE=cpu.
set -euo pipefail
OUT=${1:-benchmarks/results}
PY=${PYTHON:-python3}
MODEL=${MODEL:-ViT-B-16}
SIZE=${SIZE:-224}
DEVICE=${DEVICE:-auto}
BATCH=${BATCH:-128}
mkdir -p "$OUT"
if [ -d .gpu_wheels ]; then $PY -m pip install --no-deps --quiet .gpu_wheels/*.whl; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
$PY - "$WORK/data" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for split, n in (("train", 64), ("test", 16)):
    for c in range(10):
        folder = root / split / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(n):  # a class-coloured blob on noise: learnable, like a tiny dataset
            x = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) // 2
            x[64:192, 64:192, c % 3] = 200 + c * 5
            Image.fromarray(x).save(folder / f"{i}.jpg", quality=90)
PY
COMMON=(scenario.root="$WORK/data" model.name="$MODEL" model.pretrained= scenario.image_size="$SIZE"
        scenario.classes_per_task=5 device="$DEVICE" optim.batch_size="$BATCH")
{
  echo "# GPU check"
  echo
  echo "Command: \`bash benchmarks/gpu_check.sh\` ($(date -u +%Y-%m-%d), $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'))"
  echo
  for m in er gdro; do
    echo '```'
    timeout 180 $PY -m clipcl.cli bench imagefolder "${COMMON[@]}" method.name=$m --steps 20 --json "$OUT/gpu_bench_$m.json"
    echo '```'
  done
  echo
  echo "DDP smoke test, 2 ranks on one device (gloo), er, 10 steps a task:"
  echo '```'
  CLIPCL_DIST_BACKEND=gloo timeout 150 $PY -m torch.distributed.run --nproc_per_node=2 --master_port=29517 \
    -m clipcl.cli run imagefolder "${COMMON[@]}" method.name=er optim.max_steps=10 optim.batch_size=32 --out "$WORK/ddp" 2>&1 | grep -v Warning || true
  echo '```'
  echo
  echo "One imagefolder run at $SIZE px (gdro, 2 tasks of 20 steps):"
  echo '```'
  timeout 150 $PY -m clipcl.cli run imagefolder "${COMMON[@]}" optim.max_steps=20 --out "$WORK/run" 2>&1 || true
  echo '```'
} | tee "$OUT/gpu_check.md"
