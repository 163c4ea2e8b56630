"""Training: the input pipeline over TFRecord shards, the one training step, the loop with
validation and exact resume, and the `iap-train` command (train_cli)."""
