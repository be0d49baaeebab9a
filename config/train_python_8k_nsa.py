# NSA at 8k context on Python source (the interpreter's standard library, ~15M tokens), one H200,
# under 8 minutes. Identical to train_python_8k_full.py except for `attention` and out_dir.
#   python prepare_data.py python && python train.py config/train_python_8k_nsa.py
out_dir = "out-python-8k-nsa"
dataset = "python"

# 4 x 4 x 8192 = 131k tokens per step; 400 steps = 52M tokens (~3.5 passes over the stdlib)
batch_size = 4
gradient_accumulation_steps = 4
block_size = 8192

# 16 query heads share one KV head (GQA group of 16, as in the paper), head_dim 64
n_layer = 8
n_head = 16
n_kv_head = 1
n_embd = 1024
dropout = 0.0
attention = "nsa"
# the paper's NSA hyperparameters: l=32, d=16, l'=64, n=16, w=512
block_len = 32
block_stride = 16
select_block = 64
n_select = 16
window = 512

learning_rate = 1e-3
max_iters = 400
warmup_iters = 40
lr_decay_iters = 400
min_lr = 1e-4
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 100
eval_iters = 20
log_interval = 10
compile = False  # the NSA Triton kernels are called as they are; keep both runs alike
