"""One decoder-only transformer over text tokens and VQ-VAE visual tokens in a single stream."""
