# V100 (16/32 GB): the guide's larger micro-batch, same effective batch of 64 sequences.
data_dir = "data/wikitext103"
out_dir = "out"
batch_size = 16
gradient_accumulation_steps = 4
resume_from_checkpoint = "auto"
