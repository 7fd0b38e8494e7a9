"""Decoding loops: AR, mock-AR, mask diffusion and self-speculative, over token ids."""
