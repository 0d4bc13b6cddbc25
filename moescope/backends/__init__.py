"""Where a framework plugs in: loading a model, finding its MoE layers, capturing routing, reading and
writing expert weights, running a forward pass. `hf` is PyTorch + transformers; a new framework is
one sub-package here, and nothing in analysis or plans changes for it."""
