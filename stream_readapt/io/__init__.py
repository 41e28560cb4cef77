"""Inputs and outputs: safetensors read in row blocks, checkpoints (index, Hub), the streaming writer, the owned output folder and its journal."""
