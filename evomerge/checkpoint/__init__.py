"""HF checkpoints in and out: reading, layout, compatibility, writing."""
