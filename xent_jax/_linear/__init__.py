"""The fused linear + softmax cross-entropy op: ``api`` (the public function,
validation, dispatch), ``reference`` (materialised logits), ``xla`` (the
blockwise streaming kernel) and its pieces (``blocks``, ``layout``)."""
