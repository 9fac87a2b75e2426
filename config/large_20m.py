# The guide's "larger model": 21.3M parameters without embeddings, 40.8M with them.
data_dir = "data/wikitext103"
out_dir = "out-large"
n_embd = 384
n_layer = 12
n_head = 12
n_inner = 1536
