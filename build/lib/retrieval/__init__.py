"""Retrieval side of KA-Diff (web-augmented corpus, dense index, MLLM re-ranking).

Built in its own issue; see README.md's features table for what exists.
"""
