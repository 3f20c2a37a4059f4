"""The rank engine (``engine``), stored factors (``factors``) and frequency filters (``lowpass``).

``BACKEND_NAMES`` lists the engine's backends without importing torch: the CLIs show them in ``--backend``'s
help, and a CLI import must stay light (see ``preprocess.devices``). ``engine.BACKENDS`` is the registry;
a test keeps the two equal.
"""
BACKEND_NAMES = ("numpy", "torch", "torch-gesvd", "torch-gesvda", "torch-gesvdj", "torch32", "gram64", "cupy",
                 "randomized")
