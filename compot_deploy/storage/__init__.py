"""The stored form of a compressed model: byte accounting (budget), the typed layer record and its registry of
storage methods (record), the compact modules (modules) and the model folder on disk (artifact)."""
