"""FluxDeck's FLUX.1 engine: model code, loading, sampling and image output, usable headless (python -m engine)."""
