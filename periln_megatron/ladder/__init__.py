"""The ladder: a grid of runs (sizes x placements x seeds x learning rates), planned, submitted, watched and reported."""
