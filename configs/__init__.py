"""Training configs: `default.py` holds every field, each other file is a variant built on it.

A config file is given to iap-train by path (--config=configs/gpu.py[:switches]); the
variants import the base as `configs.default`, so the repository root must be importable:
the project's install (`pip install -e .`) provides it, as does running from the root.
"""
