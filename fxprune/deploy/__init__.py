"""Deployment passes on plain exported models (placeholder: the fxprune.deploy entry point comes
from its own branch)."""
