"""Generation: sampling parameters and filters, an engine over the KV cache working on token ids,
continuous batching, text streaming and sessions."""
