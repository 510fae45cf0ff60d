"""sklearn digits (8x8, ships offline): a small CNN, its data splits and a training entry point."""
