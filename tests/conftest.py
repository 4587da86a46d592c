"""Test fixtures shared by every tier. The data sets the tests read ship inside the package
(megatron_dapo/data/catalog.py): nothing here reads outside the repository."""
