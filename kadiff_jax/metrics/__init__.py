"""Evaluation metrics of spec section 8 (CLIP-T, CLIP-I, DINO) with our Flax encoders."""
