"""Retrieval side of KA-Diff (spec section 7): corpus, web augmentation, dense index, MLLM re-ranking.

corpus.py     entries from JSONL / WIT TSV / Parquet, validation, SQLite metadata
web.py        search, page fetching, summarising, disk cache, back-off
embed.py      text embedders (JAX BERT for all-MiniLM-L6-v2; sentence-transformers)
index.py      ScaNN and exact vector indexes with docids, upsert and delete
store.py      an index directory on disk, written atomically with a manifest
rerank.py     the reference's re-ranking policy and the LLaVA-OneVision re-ranker
retriever.py  query -> chosen reference; accuracy evaluation
"""
