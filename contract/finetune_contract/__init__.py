"""What the operator and the trainer both speak, and nothing else.

The Replicate inputs model (`inputs`), the URI rules (`uris`), the batch plan (`batching`), the trainer's input
file (`trainer_config`) and the trainer -> operator event protocol (`protocol`). This package imports neither
kopf nor kubernetes nor either side: the operator and the trainer each depend on it, never on each other.
"""
