"""Training, evaluation and checkpointing for the ``overlock`` command line (timm recipe pieces)."""
