"""Approach 1's second half: PCA + a battery of classifiers, grid-searched on validation with Ray Tune."""
