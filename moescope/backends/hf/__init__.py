"""PyTorch + transformers: load a local checkpoint (`loading`) and capture its routing (`capture`)."""
