"""The compiled oneDNN convolution library of iap-jax (iap_jax.kernels.onednn loads it)."""
import os

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libonednn_conv.so")
