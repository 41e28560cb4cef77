"""Serving profiles: an adapter rewritten for one consumer (vLLM, SGLang, llama.cpp) and the check that it loads there."""
