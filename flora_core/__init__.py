"""Flora core: FLORA and VeLoRA over array operations, for every framework."""
