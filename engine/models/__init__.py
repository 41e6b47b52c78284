"""The model code: FLUX.1's transformer, the autoencoder, the text encoders, and how each is built from its weights."""
