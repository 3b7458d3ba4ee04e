"""Everything that knows about process groups: `parallelize()` and one file per technique.
README.md in this folder gives the order they apply in and where each lives."""
