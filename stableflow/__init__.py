"""The Stable Flow method on our FLUX package: layer sweeps, vitality scoring, attention-injection editing."""

# Name of the seeded random tiny DINOv2 / CLIP that tests and CPU smoke runs use instead of a download;
# scores computed with them mean nothing.
TINY_RANDOM = "tiny-random"
