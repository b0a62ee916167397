"""The Stable Flow method on our FLUX package: layer sweeps, vitality scoring, attention-injection editing."""
