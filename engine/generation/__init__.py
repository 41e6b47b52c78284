"""A job from request to PNG: the pipeline's stages, sampling, tiled decoding, the embedding cache, PNG output."""
