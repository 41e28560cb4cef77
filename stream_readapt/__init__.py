"""stream_readapt: streaming RE-Adapt / LoRE-Adapt for Hugging Face checkpoints."""

__version__ = "0.1.0"
