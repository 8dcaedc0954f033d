"""The package version: one home, imported by the modules that record it (run configurations, model files).

Kept out of ``batchcap/__init__.py`` so that a low layer reading it does not import the package
root, which re-exports the Python API from the top layer.
"""

__version__ = "0.1.0"
