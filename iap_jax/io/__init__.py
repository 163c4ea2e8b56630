"""Reading and writing: storage (local, NFS or gs://), DICOM headers and pixels, series
selection, TFRecord shards and their metadata, the input sources of the predictor, Orbax
checkpoints, TensorBoard events and figures. Imports only `iap_jax.core`."""
