"""radixflow: a serving engine for agent programs."""
