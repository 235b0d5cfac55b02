#!/usr/bin/env bash
# Rerun the third independent audit: ./scripts/independent3/run_all.sh [REPORT_DIR] [OUT_DIR]
# REPORT_DIR defaults to $DQA_REPORT or dqa-report; OUT_DIR to audit3-out. BUDGET (s per model) env, default 470.
set -u
REPORT="${1:-${DQA_REPORT:-dqa-report}}"
OUT="${2:-audit3-out}"
BUDGET="${BUDGET:-470}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT"
for m in relu-pgd fixed2-pgd dqa2-pgd; do
  timeout $((${BUDGET%.*} + 90)) python "$HERE/attack3.py" --model "$m" --report "$REPORT" --out "$OUT" \
    --budget "$BUDGET" --seed 12345 2>&1 | tee "$OUT/$m.log"
done
python "$HERE/verify3.py" --report "$REPORT" --out "$OUT" relu-pgd fixed2-pgd dqa2-pgd 2>&1 | tee "$OUT/verify.log"
