#!/usr/bin/env bash
# One prepared run of every GPU check of onemodel (issue 17), for a CUDA machine, in one go:
#   1. attention backends (sdpa / xformers / eager): equality and fwd+bwd speed at configs/base.yaml's shapes
#   2. bf16 training MFU of the configs/base.yaml model against the bf16 matmul peak of the same run (goal >= 45%)
#   3. FSDP smoke run on one GPU through `accelerate launch` with configs/accelerate_fsdp.yaml
#   4. caption (KV cache) and MaskGIT speed at the reference config, batch 1 and 8, and the issue-17 rows
#      against the 4M re-creation (scripts/bench_generate.py --vs-reference)
# Results: one JSON line per section in $OUT_DIR/results.jsonl, the logs beside it, a summary at the end.
# Every section runs even if an earlier one fails; the exit code is the number of failed sections.
#
#   bash scripts/gpu_check.sh                      # from the repository root, on a CUDA machine (~10 min on one H100)
#   OUT_DIR=runs/gpu_check_h100 bash scripts/gpu_check.sh
#   bash scripts/gpu_check.sh --tiny               # CPU plumbing check (tiny model; what the test suite runs)
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-runs/gpu_check}
CONFIG=${CONFIG:-configs/base.yaml}
PY=${PYTHON:-python}
EXTRA=()
DEVICE=cuda
if [[ "${1:-}" == "--tiny" ]]; then EXTRA=(--tiny --repeats 1); DEVICE=cpu; fi
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/results.jsonl"
: > "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0

run() {  # run NAME CMD...: log to $OUT_DIR/NAME.log, count failures
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@" > "$OUT_DIR/$name.log" 2>&1; then
    echo "   FAILED (see $OUT_DIR/$name.log)"; failed=$((failed + 1))
  fi
}

if [[ $DEVICE == cuda ]]; then
  nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || { echo "no nvidia-smi: not a CUDA machine"; exit 1; }
  $PY -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA here'" || exit 1
  $PY -c "import xformers.ops" 2>/dev/null || echo "   (xformers not importable: pip install -e '.[xformers]' to compare it)"
fi

run attention $PY scripts/gpu_check.py --section attention --config "$CONFIG" --device $DEVICE --out "$RESULTS" "${EXTRA[@]}"
run train     $PY scripts/gpu_check.py --section train     --config "$CONFIG" --device $DEVICE --out "$RESULTS" "${EXTRA[@]}"
if [[ $DEVICE == cuda ]]; then
  run fsdp accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes 1 \
      scripts/gpu_check.py --section fsdp --config "$CONFIG" --out "$RESULTS"
  run bench_generate $PY scripts/bench_generate.py --device cuda --vs-reference --repeats 5 \
      --json "$OUT_DIR/bench_generate_vs_reference.json"
  run bench_model $PY scripts/bench_model.py --device cuda --batch 64 --steps 20 --dtypes bf16 \
      --json "$OUT_DIR/bench_model.json"
fi
run generate  $PY scripts/gpu_check.py --section generate  --config "$CONFIG" --device $DEVICE --out "$RESULTS" "${EXTRA[@]}"

echo "== summary ($RESULTS)"
$PY - "$RESULTS" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keys = [k for k in ("mfu", "tokens_per_s", "losses", "caption_tokens_per_s_b1", "caption_tokens_per_s_b8",
                        "maskgit_s_per_image_b1", "maskgit_s_per_image_b8", "error") if k in r]
    print(f"{r['section']:10s} ok={r['ok']}", {k: r[k] for k in keys})
PYEOF
echo "failed sections: $failed"
exit $failed
