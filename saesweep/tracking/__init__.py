"""MLflow tracking: the sweep's parent run, one child run per trial, champions and the registry."""
