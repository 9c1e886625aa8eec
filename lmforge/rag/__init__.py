"""Retrieval-augmented generation: documents and chunks, embeddings, the context store (faiss + SQLite), search."""
