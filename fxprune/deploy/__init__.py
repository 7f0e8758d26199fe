"""Deployment passes on plain exported models (placeholder: the fxprune.deploy entry point is merged from its own branch)."""
