# Tiny GPT on Shakespeare's plays, sized for a laptop CPU (2 cores: about 6 minutes, ~1 s/step;
# val loss falls from 10.8 to about 5.2). Flip attention to "full" for the baseline; each run
# gets its own folder (out_dir names the attention):
#   python prepare_data.py && python train.py config/train_shakespeare_cpu.py # out-shakespeare-nsa
#   python train.py config/train_shakespeare_cpu.py --attention=full          # out-shakespeare-full
#   python sample.py --out_dir=out-shakespeare-full
out_dir = "out-shakespeare-{attention}"
dataset = "shakespeare"
device = "cpu"

# 8 x 256 = 2k tokens per step: on CPU the 50k-word output layer costs most of the step
batch_size = 8
block_size = 256
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
dropout = 0.0
attention = "nsa"
# NSA blocks scaled down so that sparsity matters at 256 tokens: a query past token ~128 sees
# 4 selected blocks of 32 (128 tokens), a 64-token window and the compressed blocks.
block_len = 16
block_stride = 8
select_block = 32
n_select = 4
window = 64

learning_rate = 2e-3
max_iters = 300
warmup_iters = 30
lr_decay_iters = 300
min_lr = 2e-4
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 100
eval_iters = 10
log_interval = 10
