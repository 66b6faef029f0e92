"""Ray job entry points (``python -m jobs.<name>``); they wire operators, storage and cluster."""
