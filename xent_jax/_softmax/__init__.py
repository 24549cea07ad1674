"""The softmax cross-entropy op: ``api`` (public functions, validation and
dispatch), ``reference`` (the formula under autodiff), ``xla`` (the default
closed-form kernel) and ``targets`` (the effective targets both use)."""
