"""FluxDeck's bootstrap: the Python environment, the model manifest, verified downloads, the wizard, the portable 7z.

`python -m bootstrap env` must run on a bare Python (the embeddable one, before any dependency is installed):
modules it imports use the standard library only; requests, psutil and py7zr are imported where they are used.
"""
