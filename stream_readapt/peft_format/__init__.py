"""The PEFT adapter format: key names, scaling, config checks."""
