"""rankshard: rank-k dataset materialization, streaming loaders, training and robustness evaluation.

The four stages live in the repository's top-level folders and install under this package:
``rankshard.preprocess``, ``rankshard.loaders``, ``rankshard.train``, ``rankshard.evaluate``
(mapped in ``setup.cfg``), so nothing but ``rankshard`` lands at the top level of site-packages.
"""
__version__ = "0.2.0"
