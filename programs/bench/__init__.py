"""Benchmarks behind ``reco bench``: one module per benchmark, each returning the issue's JSON contract.

``ingest`` (pipeline vs encoder-only; ``peer`` for clip-retrieval), ``search`` (exact index vs Qdrant;
``stretch`` for 10M pairs in int8), ``refine`` (CLIP vs RECO prediction), ``train`` (fusion samples/s),
``growth`` (curves), ``gpu``; ``suite`` runs them all and ``report`` writes docs/performance.md.
"""
