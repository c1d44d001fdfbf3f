"""Reproductions of the paper's experiments: `mfr-sae reproduce NAME`."""
