"""Data: readers of the data sets behind one registry, embedding sources, images and their
cache, transforms, zero-shot splits, the training loader and verified downloads."""
