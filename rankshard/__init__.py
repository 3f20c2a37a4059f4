"""rankshard: rank-k dataset materialization, streaming loaders, training and robustness evaluation.

The four stages live in the repository's top-level folders and install under this package:
``rankshard.preprocess``, ``rankshard.loaders``, ``rankshard.train``, ``rankshard.evaluate``
(mapped in ``setup.cfg``), so nothing but ``rankshard`` lands at the top level of site-packages.
"""
import os as _os

__version__ = "0.2.0"

# Run from a source checkout without installing (PYTHONPATH=checkout, e.g. benchmarks/gpu_suite.sh on a lent
# GPU machine), the stage folders sit beside this one instead of inside it: let the import system look there
# too. Installed (wheel or editable), they are found inside the package and this does nothing.
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "preprocess")):
    __path__.append(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
