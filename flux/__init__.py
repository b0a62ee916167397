"""Stable Flow's FLUX package: a drop-in replacement for the official `flux` package, with layer hooks."""
