"""Storage: artifact layout, Parquet schemas, fsspec local/S3 I/O, manifests, resumability."""
