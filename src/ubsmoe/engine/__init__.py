"""The round engine: clients, local training, per-tier evaluation, and the in-process simulation runner."""
