# Issue 12's passkey recipe at 8k context: a smaller, faster model than train_python_8k_*.py,
# three quarters of its rows rebuilt from passkey documents (README: "Passkey retrieval"), and
# more, smaller steps. Both attentions and two seeds ran at once on one H200 (BENCHMARKS.md).
#   python prepare_data.py python
#   python train.py config/train_python_8k_passkey.py                    # out-passkey-nsa-1337
#   python train.py config/train_python_8k_passkey.py --attention=full   # out-passkey-full-1337
#   python train.py config/train_python_8k_passkey.py --seed=1338        # a second seed
#   python eval.py passkey --out_dir=out-passkey-nsa-1337,out-passkey-full-1337 --plot=pk.png
out_dir = "out-passkey-{attention}-{seed}"
dataset = "python"

# 4 x 8192 = 32k tokens per step; 1200 steps = 39M tokens
batch_size = 4
gradient_accumulation_steps = 1
block_size = 8192
passkey_fraction = 0.75
passkey_min_length = 64    # log-uniform up to block_size: as many 64-128 as 4k-8k documents

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
max_iters = 1200
warmup_iters = 100
lr_decay_iters = 1200
min_lr = 1e-4
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 200
eval_iters = 10
log_interval = 20
progress = False
compile = False
