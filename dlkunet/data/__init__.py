"""Datasets: Synapse and ACDC (TransUNet layout), NIfTI folders, and a built-in synthetic set."""
