"""Pure compute: models, pooling, local features, whitening, kNN, metrics (no Ray, no I/O)."""
