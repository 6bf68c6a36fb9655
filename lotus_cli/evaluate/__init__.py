"""The paper's evaluation protocol (Sec. 5): Marigold-format depth sets, DSINE-format normal sets, the
alignment and the metrics. ``metrics`` is pure numpy; ``datasets`` reads folders and tar archives;
``run`` is the loop over a dataset with a model or a folder of precomputed predictions."""
