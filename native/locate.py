"""Prints, for CMake, the XLA FFI include folder, oneDNN's include folder and its library
(';'-separated): ONEDNN_ROOT where set (a prefix with include/ and lib/), else the files of
the onednn-devel-cpu-gomp wheel (headers) and its onednn-cpu-gomp dependency (library)."""
import importlib.metadata
import os
import sys

import jaxlib


def installed(distribution: str, path_end: str) -> str:
    dist = importlib.metadata.distribution(distribution)
    for file in dist.files or ():
        if str(file).replace(os.sep, "/").endswith(path_end):
            return os.path.realpath(dist.locate_file(file))
    sys.exit(f"locate.py: {distribution} has no {path_end}")


ffi = os.path.join(os.path.dirname(jaxlib.__file__), "include")
root = os.environ.get("ONEDNN_ROOT")
if root:
    include, library = os.path.join(root, "include"), os.path.join(root, "lib", "libdnnl.so")
else:
    header = installed("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
    include = os.path.dirname(os.path.dirname(os.path.dirname(header)))
    library = installed("onednn-cpu-gomp", "/libdnnl.so")
for path in (os.path.join(ffi, "xla", "ffi", "api", "ffi.h"),
             os.path.join(include, "oneapi", "dnnl", "dnnl.hpp"), library):
    if not os.path.exists(path):
        sys.exit(f"locate.py: {path} is missing")
print(";".join((ffi, include, library)))
