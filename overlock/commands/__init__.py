"""Subcommands of the ``overlock`` CLI; each module has ``add_arguments(parser)`` and ``run(args)``."""
