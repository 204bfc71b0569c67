"""The programs built on the core: benchmarks (``reco bench``), the paper reproduction (``reco reproduce``)
and base-encoder pre-training (``reco pretrain``).

They sit above ``app/`` (the library) the way ``open_clip_train`` sits above ``open_clip``: they import the
core and the layers that they time (ingestion, api), and nothing below imports them. Their commands join
``reco`` through the ``reco.cli`` entry point (programs.cli:register).
"""
