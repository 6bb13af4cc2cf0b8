"""Where the weights come from: tiny.py (offline toy model), synthetic.py (full size, random), sources.py (the one
entry, `load_model`, and real weights from a hub id or a directory)."""


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what was tried and what to do."""
