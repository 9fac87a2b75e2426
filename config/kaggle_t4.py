# The original guide's run on a Kaggle T4 (16 GB): WikiText-103, 3 epochs, effective batch 64 x 512 tokens.
# Prepare the data first: python data.py wikitext103
import os

_kaggle = os.path.isdir("/kaggle/working")
out_dir = "/kaggle/working" if _kaggle else "out"
data_dir = "data/wikitext103"

vocab_size = 50257
n_positions = 512
n_embd = 256
n_layer = 8
n_head = 8
n_inner = 1024

batch_size = 8
gradient_accumulation_steps = 8  # effective batch 64
learning_rate = 5e-4
weight_decay = 0.01
max_grad_norm = 1.0
epochs = 3
warmup_steps = 500
max_length = 512

save_steps = 1000
eval_steps = 500
max_checkpoints = 4
resume_from_checkpoint = "auto"  # a rerun of the notebook continues where the last session stopped

max_runtime = "8h30m"  # Kaggle sessions end at 9 hours: stop cleanly with a checkpoint before that

# With --wandb_project: the W&B run's name (by default out_dir's folder, which on Kaggle is "working").
wandb_run_name = "kaggle-t4"
