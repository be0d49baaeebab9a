# Issue 12's passkey recipe at 8k context (recipe 3 in BENCHMARKS.md): a smaller, faster model
# than train_python_8k_*.py, every row packed with passkey documents (README: "Does it use long
# context?"), and a length curriculum: 1500 steps on documents of 64-2048 tokens, then the same
# run resumed for 1200 steps on documents of 512-8192 tokens, under one cosine schedule (2700).
# On an H200 NSA and full attention ran at once, each phase in under 5 minutes (BENCHMARKS.md).
#   python prepare_data.py python
#   python train.py config/train_python_8k_passkey.py                  # out-passkey-nsa-1337
#   python train.py config/train_python_8k_passkey.py --init_from=resume \
#       --passkey_min_length=512 --passkey_max_length=8192 --max_iters=2700
#   (both again with --attention=full for the baseline, and with --seed=1338 for a second seed)
#   python eval.py passkey --out_dir=out-passkey-nsa-1337,out-passkey-full-1337 --samples=20 \
#       --plot=passkey.png
out_dir = "out-passkey-{attention}-{seed}"
dataset = "python"

# 4 x 8192 = 32k tokens per step; 2700 steps = 88M tokens
batch_size = 4
gradient_accumulation_steps = 1
block_size = 8192
passkey_fraction = 1.0
passkey_min_length = 64    # log-uniform: as many 64-128 as 1k-2k documents
passkey_max_length = 2048  # phase 2 (the resume above): 512 to 8192

# 16 query heads share one KV head (G = 16, as in the paper), head_dim 32
n_layer = 6
n_head = 16
n_kv_head = 1
n_embd = 512
dropout = 0.0
attention = "nsa"
# the paper's NSA hyperparameters: l=32, d=16, l'=64, n=16, w=512
block_len = 32
block_stride = 16
select_block = 64
n_select = 16
window = 512

learning_rate = 1e-3
max_iters = 1500           # phase 2: 2700
warmup_iters = 100
lr_decay_iters = 2700
min_lr = 1e-4
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 250
eval_iters = 10
log_interval = 20
progress = False
compile = False
