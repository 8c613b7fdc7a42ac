"""Attention interpolation (AID / PAID, seed 003) on the functional UNet: `../shared/design/PAID_SPEC.md`."""
