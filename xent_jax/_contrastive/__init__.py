"""The contrastive ops (``"clip"``, ``"siglip"``): ``api``, ``reference``, ``xla``."""
