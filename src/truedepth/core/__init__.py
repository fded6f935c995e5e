"""The core: plans, the layer anatomy, the transform, Hugging Face classes, loading, model shapes."""
