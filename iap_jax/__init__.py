"""iap-jax: predict MR acquisition parameters from pixels with sharded Flax ResNets."""
import os

# Training and prediction never use TensorFlow: etils.epath (which Orbax and this package
# read and write through) would otherwise reach gs:// through tf.io.gfile wherever
# TensorFlow is installed (the prep's extra), and import it. gcsfs serves gs:// instead.
os.environ.setdefault("EPATH_USE_TF", "false")
