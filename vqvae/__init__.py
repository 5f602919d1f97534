"""VQ-VAE visual tokenizer: 32x32 images <-> grids of discrete tokens (see vqvae/tokenizer.py)."""
