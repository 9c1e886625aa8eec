"""Generation: a preallocated KV cache, sampling filters and an engine working on token ids."""
