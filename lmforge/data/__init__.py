"""Datasets lmforge builds or reads: the built-in world, pretraining corpora, chat and preference data."""
