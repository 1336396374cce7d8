"""A tiny Stable Diffusion pretrained by the project on a procedural image world, so that the whole
DreamBooth method runs offline on a laptop CPU in minutes (see toy/README.md)."""
