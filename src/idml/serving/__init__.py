"""Serving a trained model: load it, embed images, embeddings files, faiss indexes and search,
export, and the HTML report. Never imports idml.training."""
