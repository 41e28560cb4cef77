"""Where Δ comes from: the instruct model, a full RE-Adapter, a LoRE-Adapter (one DeltaSource interface)."""
