# The guide's "smaller model". Its "~5M" counts no embeddings: 2.7M without them, 12.4M with the
# 50257 x 192 token embedding.
data_dir = "data/wikitext103"
out_dir = "out-small"
n_embd = 192
n_layer = 6
n_head = 6
n_inner = 768
