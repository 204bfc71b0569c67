"""The RECO fusion: config, model, loss, checkpoints and training on cached embeddings."""
