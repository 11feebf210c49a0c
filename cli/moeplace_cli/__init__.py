"""``moeplace``: the command line over the placement library (solve, evaluate, compare)."""
