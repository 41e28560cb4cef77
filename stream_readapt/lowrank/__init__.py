"""LoRE-Adapt: the randomized SVD and rank targets, dense and batched over experts, and the adapter it writes."""
