"""Evaluation runners over published datasets (DreamBooth)."""
