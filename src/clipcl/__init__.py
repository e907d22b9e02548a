"""clipcl: continual learning of CLIP models with a tiny replay memory."""
__version__ = "0.1.0"
