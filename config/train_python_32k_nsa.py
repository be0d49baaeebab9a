# NSA at 32k context on Python source (the interpreter's standard library plus installed
# packages: ~50M tokens), one H200. A query reads ~2k compressed + 1k selected + 512 window keys
# instead of up to 32k. Full attention at this length is the expensive part NSA avoids.
#   python prepare_data.py python --with_site_packages
#   python train.py config/train_python_32k_nsa.py
out_dir = "out-python-32k-nsa"
dataset = "python_site"

# 1 x 16 x 32768 = 524k tokens per step
batch_size = 1
gradient_accumulation_steps = 16
block_size = 32768

n_layer = 8
n_head = 16
n_kv_head = 1
n_embd = 1024
dropout = 0.0
attention = "nsa"
block_len = 32
block_stride = 16
select_block = 64
n_select = 16
window = 512

learning_rate = 1e-3
max_iters = 200
warmup_iters = 20
lr_decay_iters = 200
min_lr = 1e-4
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 50
eval_iters = 10
log_interval = 5
compile = False
