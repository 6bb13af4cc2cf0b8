"""One module per optimisation, behind an ordered registry (see registry.py and base.py)."""
