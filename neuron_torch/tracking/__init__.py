"""Tracking in MLflow: the tracking URI, the store, reachability, the spool, the writer thread, the run, the
Lightning callback, the model's files, the figures, the pyfunc model and the safe loader."""
