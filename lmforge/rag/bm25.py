"""Lexical search over a store's chunks: a BM25 index (`bm25s`, built in memory), and reciprocal rank
fusion of several rankings (hybrid search)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RRF_K = 60  # reciprocal rank fusion: score = sum over rankings of 1 / (RRF_K + rank)
# BM25 ignores Lucene's English stopwords and the words of questions, which documents rarely share in meaning.
QUESTION_WORDS = ("who", "whom", "whose", "which", "what", "when", "where", "why", "how", "do", "does", "did", "has",
                  "have", "had", "were", "been", "he", "she", "his", "her", "him", "its", "i", "me", "my", "we", "our",
                  "you", "your", "can", "could", "would", "should", "about", "tell")

Ranking = list[tuple[int, float]]  # (chunk id, score), best first


class BM25Index:
    """BM25 over texts, each known by an integer id."""

    def __init__(self, ids: Sequence[int], texts: Sequence[str]) -> None:
        import bm25s

        self._tokenizer = bm25s.tokenization.Tokenizer(stopwords=[*bm25s.stopwords.STOPWORDS_EN, *QUESTION_WORDS])
        self._retriever = bm25s.BM25()
        self._ids = np.array(ids, np.int64)
        if len(texts):
            self._retriever.index(self._tokenizer.tokenize(list(texts), return_as="tuple", show_progress=False),
                                  show_progress=False)

    def rank(self, queries: list[str], n: int) -> list[Ranking]:
        """Per query, the top `n` (id, BM25 score) with a positive score."""
        if not len(self._ids):
            return [[] for _ in queries]
        tokens = self._tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
        found, scores = self._retriever.retrieve(tokens, k=min(n, len(self._ids)), show_progress=False)
        return [[(int(self._ids[d]), float(s)) for d, s in zip(row_found, row_scores) if s > 0]
                for row_found, row_scores in zip(found, scores)]


def fuse(*rankings: Ranking) -> Ranking:
    """Reciprocal rank fusion: (chunk id, fused score), best first."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (i, _) in enumerate(ranking, 1):
            fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))
