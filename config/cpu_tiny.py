# A tiny model that trains end to end on a laptop CPU in a minute or two, to try the whole tool:
#   python data.py wikitext2 && python train.py config/cpu_tiny.py && python sample.py --out_dir out-cpu-tiny
data_dir = "data/wikitext2"
out_dir = "out-cpu-tiny"
device = "cpu"
compile = False
n_positions = 128
n_embd = 64
n_layer = 2
n_head = 2
n_inner = 256
max_length = 64
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 2e-3
min_lr = 2e-4
warmup_steps = 20
max_steps = 200
eval_steps = 25
eval_iters = 20
save_steps = 100
sample_tokens = 20
