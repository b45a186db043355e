"""The math and the networks: layers (each forward line beside its derivative), networks with hand-written
backprop, the update rules and the one function that applies an update, and the coefficient table's statistics.
Plain torch: no Lightning, no MLflow."""
