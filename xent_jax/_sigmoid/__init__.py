"""The sigmoid binary cross-entropy op: ``api``, ``reference``, ``xla``."""
