"""Course exercises on this project's DreamBooth, with an automatic grader (assignments/README.md)."""
