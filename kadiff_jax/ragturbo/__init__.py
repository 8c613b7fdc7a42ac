"""Retrieval-augmented one-step generation (ImageRAGTurbo, seed 002) on the UNet's H-space seam:
`../shared/design/HSPACE_SPEC.md`."""
