"""What a knowledge adapter adds to a weight: LoRA / rsLoRA / DoRA / modules_to_save rows of Ψ, experts (target_parameters)."""
