"""The shared contracts, with no I/O: the IAP schema and label encodings, the pixel path,
the per-IAP scores, the device mesh and the console. Every other stage builds on these."""
