"""Training: corpus building, tokenizer training and token packing for the denoiser (SPEC section 4)."""
