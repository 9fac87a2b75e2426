# Kaggle P100 (16 GB, compute capability 6.0): the guide's settings (the defaults of train.py) with
# fp16 autocast + GradScaler and no torch.compile, both chosen automatically for this GPU.
#
# NOTE: Kaggle's default PyTorch (CUDA 12.8 wheels) has no kernels for the P100 (sm_60): train.py stops at
# start with one line saying so. Either switch the notebook's accelerator to "GPU T4", or install a CUDA 12.6
# build of torch first:  pip install torch --index-url https://download.pytorch.org/whl/cu126
import os

out_dir = "/kaggle/working" if os.path.isdir("/kaggle/working") else "out"
data_dir = "data/wikitext103"
resume_from_checkpoint = "auto"
max_runtime = "8h30m"  # Kaggle sessions end at 9 hours

# With --wandb_project: the W&B run's name (by default out_dir's folder, which on Kaggle is "working").
wandb_run_name = "kaggle-p100"
