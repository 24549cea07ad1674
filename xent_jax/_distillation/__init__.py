"""The distillation op (``"distillation"``): ``api``, ``reference``, ``xla``."""
