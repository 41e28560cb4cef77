"""What each tensor is: the one per-key table derived from the transformers classes (cached), the key <-> parameter map, the plan."""
