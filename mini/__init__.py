"""flux-mini: a small FLUX (the repo's own Flux and AutoEncoder classes) trained on a procedural captioned world.

`mini.world` renders and captions scenes, `mini.detect` reads them back analytically, `mini.train` trains the
autoencoder and the transformer, `mini.evaluate` measures the shipped model.
"""
