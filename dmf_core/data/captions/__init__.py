"""Captions: FineGPR attribute tables to sentences (the ``captions`` stage) and their controls."""
